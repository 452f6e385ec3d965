"""Tiny offline fixtures for the trainer tests: a word-level tokenizer, a random Llama built from a config, and a
small preference set that a model can learn in a few dozen steps. Nothing is downloaded."""
import json
import random
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
