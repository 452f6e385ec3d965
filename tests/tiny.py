"""Tiny offline fixtures for the trainer tests: a word-level tokenizer, a random Llama built from a config, and a
small preference set that a model can learn in a few dozen steps. Nothing is downloaded."""
import json
import os
import random
import signal
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
WORDS = ["the", "movie", "was", "plot", "acting", "and", "it", "is", "a", "very", "so", "but",
         "good", "great", "fine", "bad", "awful", "poor", "yes", "no", "!", "."]


def make_tokenizer(bos=True, words=WORDS):
    vocab = {w: i for i, w in enumerate(SPECIAL + list(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:  # like Llama: every encoded text starts with <s>
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def make_model_dir(path: Path, seed=0, bos=True, words=WORDS, **config) -> str:
    """A 2-layer Llama (~0.1M parameters; hidden 64 = one bitsandbytes 4-bit block) with random weights and the
    tokenizer above, saved in `path`; `config` overrides LlamaConfig fields (tie_word_embeddings, vocab_size, ...)."""
    tokenizer = make_tokenizer(bos, words)
    torch.manual_seed(seed)
    config = LlamaConfig(**{**dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id), **config})
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def make_gpt2_dir(path: Path, n_positions=16, seed=0) -> str:
    """A 2-layer GPT-2 with a learned table of `n_positions` positions (no BOS), and the tokenizer above."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = make_tokenizer(bos=False)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=n_positions,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def make_preference_dir(path: Path, n_train=64, n_test=32, seed=0) -> str:
    """Pairs whose chosen completion is always a positive phrase and rejected a negative one: learnable."""
    rng = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        rows = []
        for _ in range(n):
            prompt = " ".join(rng.choice(["the movie was", "the plot is", "the acting was", "it is"]).split()
                              + rng.sample(["very", "so", "a", "and"], rng.randint(0, 2)))
            rows.append({"prompt": prompt, "chosen": " " + " ".join(rng.choices(["good", "great", "fine", "yes"], k=rng.randint(1, 3))),
                         "rejected": " " + " ".join(rng.choices(["bad", "awful", "poor", "no"], k=rng.randint(1, 3)))})
        (path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ---- running dpo.py on the fixtures ------------------------------------------------------------------------------


def run_argv(tiny, out, *extra):
    """Command-line words of a short run on the tiny fixtures, as a user would type them (later words win)."""
    return ["--model", tiny["model"], "--dataset", tiny["dataset"], "--output_dir", str(out), "--max_length", "32",
            "--per_device_train_batch_size", "4", "--logging_steps", "1", "--learning_rate", "1e-2",
            "--show_examples", "0", *extra]


def run_config(tiny, out, *extra):
    """The resolved Config of those words (what `python dpo.py ...` would run)."""
    from harness import options

    return options.parse_args(run_argv(tiny, out, *extra))


def read_records(out, timing=True):
    """metrics.jsonl as a list of dicts; timing=False drops tokens_per_second, which no two runs share."""
    rows = [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return rows if timing else [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in rows]


def interrupt_at_loss_call(monkeypatch, n, sig=signal.SIGINT):
    """Deliver a real signal (Ctrl-C's SIGINT, or a scheduler's SIGTERM) to this process during the n-th loss
    computation, i.e. in the middle of a step."""
    import losses

    calls, real = {"n": 0}, losses.dpo_loss

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), sig)
        return real(*args, **kwargs)

    monkeypatch.setattr(losses, "dpo_loss", wrapped)
