"""The shipped assets (demo/assets/), the ground-truth reward (sentiment.py) and the sampling evaluation
(sample_eval.py)."""

import copy
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from demo.sample_eval import generate, sample_eval, sequence_logps  # noqa: E402
from dpo import completion_logps  # noqa: E402


def SCORE(model, batch):  # the trainer's own scoring, as dpo.py passes it
    return completion_logps(model, batch)[0]
from demo.sentiment import sentiment_score  # noqa: E402

MODEL_DIR = ROOT / "demo" / "assets" / "tiny-sentiment-lm"
DATA_DIR = ROOT / "demo" / "assets" / "sentiment-prefs"


def load_make_assets():
    spec = importlib.util.spec_from_file_location("make_assets", ROOT / "scripts" / "make_assets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines functions only: main() runs under __name__ == "__main__"
    return module


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model runs as fast on one thread, and far faster when other jobs share the cores (spinning
    OpenMP threads then wait on each other); the previous setting comes back after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval()


def read_jsonl(split):
    with open(DATA_DIR / f"{split}.jsonl") as f:
        return [json.loads(line) for line in f]


# ---- the reward -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("the acting was superb .", 1),                                   # one positive word
    ("the plot was dull and the ending was awful .", -2),             # two negative words
    ("the plot was not good .", -1),                                  # "not good" is one negative word
    ("the pacing was never boring .", 1),                             # "never boring" is one positive word
    ("i would not recommend it to anyone .", -1),                     # "not recommend": negative
    ("the music was great but the script was weak .", 0),             # +1 - 1
    ("i watched it last night .", 0),                                 # no sentiment word
    ("", 0),
    ("The acting was GREAT!", 1),                                     # case and attached punctuation
    ("the ending was not . great", 1),                                # the clause ends at ".", so "not" flips nothing
    ("i loved the plot . the cast was not very good . overall , a masterpiece .", 1),  # +1 (loved) -1 (not good) +1
])
def test_sentiment_score_by_hand(text, expected):
    """score = #positive - #negative words, a negator flipping the next sentiment word of its clause; the comment
    on each case is the hand count."""
    assert sentiment_score(text) == expected


def test_grammar_and_lexicon_agree():
    """Every positive review the grammar writes scores > 0 and every negative one < 0 (the lexicon covers the
    language, and the negated templates flip correctly)."""
    import random
    make_assets = load_make_assets()
    make_assets.check_language()
    rng = random.Random(0)
    assert all(sentiment_score(make_assets.make_review(rng, "+")) > 0 for _ in range(300))
    assert all(sentiment_score(make_assets.make_review(rng, "-")) < 0 for _ in range(300))
    reviews = [make_assets.make_review(rng) for _ in range(100)]
    assert all(make_assets.grammatical(s + " .") for r in reviews for s in r.split(" .") if s.strip())
    assert not make_assets.grammatical("the plot was was good .") and not make_assets.grammatical("i brilliant .")


def test_sft_model_is_fluent_and_balanced(model, tokenizer):
    """The shipped SFT model continues held-out prompts in the grammar's language (at least 90% of sampled
    sentences are grammatical) and, at temperature 1, positively and negatively about equally often (each
    between 30% and 60% of 140 samples; the grammar writes 1/3 positive, 1/3 negative, 1/3 mixed reviews)."""
    make_assets = load_make_assets()
    prompts = [r["prompt"] for r in read_jsonl("test")[:70]]
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts for _ in range(2)]
    completions = generate(model, tokenizer, prompt_ids, max_new_tokens=48, seed=0, batch_size=140)
    reviews = [tokenizer.decode(p + c, skip_special_tokens=True) for p, c in zip(prompt_ids, completions)]
    sentences = [s + " ." for r in reviews for s in r.split(" .") if s.strip()]
    assert sum(map(make_assets.grammatical, sentences)) / len(sentences) >= 0.9
    scores = [sentiment_score(r) for r in reviews]
    assert 0.3 <= sum(x > 0 for x in scores) / len(scores) <= 0.6
    assert 0.3 <= sum(x < 0 for x in scores) / len(scores) <= 0.6


# ---- the assets -------------------------------------------------------------------------------------------------

def test_assets_load_offline(tmp_path):
    """Model, tokenizer, chat template and both data files load with the hub switched off, in a fresh process
    (huggingface_hub reads HF_HUB_OFFLINE at import time)."""
    code = f"""
import json, torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(MODEL_DIR)!r})
model = AutoModelForCausalLM.from_pretrained({str(MODEL_DIR)!r})
ids = tok("the plot was dull .", return_tensors="pt")["input_ids"]
chat = tok.apply_chat_template([{{"role": "user", "content": "the plot was"}}], add_generation_prompt=True,
                               tokenize=False)
files = {{"train": {str(DATA_DIR / 'train.jsonl')!r}, "test": {str(DATA_DIR / 'test.jsonl')!r}}}
data = load_dataset("json", data_files=files, cache_dir={str(tmp_path)!r})
print(json.dumps({{"arch": type(model).__name__, "logits": list(model(ids).logits.shape), "ids": ids[0].tolist(),
                  "chat": chat, "columns": data["train"].column_names, "rows": [len(data["train"]), len(data["test"])]}}))
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    v = tok.get_vocab()
    assert got["arch"] == "LlamaForCausalLM"
    assert got["ids"] == [v["<bos>"], v["the"], v["plot"], v["was"], v["dull"], v["."]]  # BOS, then one id per word
    assert got["logits"] == [1, 6, len(v)]
    assert got["chat"] == "<bos><|user|> the plot was <|end|> <|assistant|>"
    assert sorted(got["columns"]) == ["chosen", "prompt", "rejected"]
    assert got["rows"] == [len(read_jsonl("train")), len(read_jsonl("test"))]


def test_assets_fit_the_size_budget():
    """The issue's budget: all of demo/assets/ in at most 10 MB (the float32 model is about 4.3 MB of it)."""
    total = sum(p.stat().st_size for p in (ROOT / "demo" / "assets").rglob("*") if p.is_file())
    assert total <= 10 * 1024 * 1024


def test_chat_template_renders_one_bos(tokenizer):
    """Template + tokenizer: <bos> comes from the template only, and the assistant turn ends with <|end|>."""
    v = tokenizer.get_vocab()
    messages = [{"role": "user", "content": "the plot was"}, {"role": "assistant", "content": "dull ."}]
    ids = list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    expected = ["<bos>", "<|user|>", "the", "plot", "was", "<|end|>", "<|assistant|>", "dull", ".", "<|end|>"]
    assert ids == [v[t] for t in expected]


def test_preference_data(tokenizer):
    """Standard explicit format; the prompt tokens are a prefix of prompt + completion (so the completion starts
    exactly where the prompt ends); no unknown words; chosen scores at least min_score_gap (2) above rejected;
    test prompts never appear in train; the first 64 test rows have distinct prompts (round-robin order)."""
    make_assets = load_make_assets()
    train, test = read_jsonl("train"), read_jsonl("test")
    assert 1000 <= len(train) <= 3000 and 150 <= len(test) <= 300
    for i, row in enumerate(train + test):
        assert set(row) == {"prompt", "chosen", "rejected"}, i
        assert not row["prompt"].endswith(" ") and row["chosen"].startswith(" ") and row["rejected"].startswith(" "), i
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        for key in ("chosen", "rejected"):
            ids = tokenizer(row["prompt"] + row[key])["input_ids"]
            assert ids[:len(prompt_ids)] == prompt_ids and len(ids) > len(prompt_ids), (i, key)
            assert tokenizer.unk_token_id not in ids, (i, key)
        gap = sentiment_score(row["prompt"] + row["chosen"]) - sentiment_score(row["prompt"] + row["rejected"])
        assert gap >= make_assets.SETTINGS["min_score_gap"], i
    assert not {r["prompt"] for r in test} & {r["prompt"] for r in train}
    assert len({r["prompt"] for r in test[:64]}) == 64


def test_make_assets_rebuilds_committed_tokenizer_and_config(tokenizer):
    """The script's fast builders (no training) reproduce the committed vocabulary, special tokens, chat
    template and model/generation configs."""
    make_assets = load_make_assets()
    built = make_assets.build_tokenizer()
    assert built.get_vocab() == tokenizer.get_vocab()
    assert built.chat_template == tokenizer.chat_template
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(built, name) == getattr(tokenizer, name), name
    text = "i watched it last night . the plot was not good <eos>"
    assert built(text)["input_ids"] == tokenizer(text)["input_ids"]

    def config_dict(config):
        return {k: v for k, v in config.to_dict().items() if k != "transformers_version"}
    assert config_dict(make_assets.build_config(built)) == config_dict(LlamaConfig.from_pretrained(MODEL_DIR))
    committed = GenerationConfig.from_pretrained(MODEL_DIR)
    assert config_dict(make_assets.build_generation_config(built)) == config_dict(committed)


# ---- sample_eval ------------------------------------------------------------------------------------------------

def uniform_copy(model):
    """A copy whose final RMSNorm weight is zero: every hidden state becomes 0, every logit 0, so the next-token
    distribution is uniform and log p(token) = -log V for every token."""
    uniform = copy.deepcopy(model)
    torch.nn.init.zeros_(uniform.model.norm.weight)
    return uniform


def test_sequence_logps_counts_completion_tokens_only(model):
    """Under a uniform model, log p(y|x) = -len(y) * log V: prompt tokens and padding must not count.
    Rows of different lengths in one padded batch: completions of 3, 1 and 5 tokens."""
    V = model.config.vocab_size
    prompts = [[1, 20, 21], [1, 22], [1, 23, 24, 25, 26]]
    completions = [[30, 31, 2], [2], [32, 33, 34, 35, 2]]
    logps = sequence_logps(uniform_copy(model), prompts, completions, score=SCORE, pad_id=0)
    assert logps == pytest.approx([-3 * math.log(V), -1 * math.log(V), -5 * math.log(V)], rel=1e-5)


def test_sequence_logps_ignores_padding(model):
    """A batch of rows of different lengths gives the same log-probs as each row alone (no padding)."""
    prompts = [[1, 20, 21], [1, 22], [1, 23, 24, 25, 26]]
    completions = [[30, 31, 2], [2], [32, 33, 34, 35, 2]]
    batched = sequence_logps(model, prompts, completions, score=SCORE, pad_id=0)
    alone = [sequence_logps(model, [p], [c], score=SCORE, pad_id=0)[0] for p, c in zip(prompts, completions)]
    assert batched == pytest.approx(alone, abs=1e-4)


def test_generate_stops_at_eos_and_is_seeded(model, tokenizer):
    prompt_ids = [tokenizer("the plot was")["input_ids"], tokenizer("i watched it")["input_ids"]] * 2
    first = generate(model, tokenizer, prompt_ids, max_new_tokens=40, seed=3)
    assert first == generate(model, tokenizer, prompt_ids, max_new_tokens=40, seed=3)
    eos = set(model.generation_config.eos_token_id)
    for ids in first:
        assert len(ids) <= 40 and not eos & set(ids[:-1])  # an EOS can only be the last token


def test_sample_eval_identical_models(model, tokenizer):
    """policy == reference: same seed, same samples, so every pair ties (win rate 1/2), both mean rewards are
    equal, and log pi - log pi_ref = 0 on every sample (KL 0)."""
    prompts = [r["prompt"] for r in read_jsonl("test")[:6]]
    result = sample_eval(model, tokenizer, prompts, score=SCORE, reference=copy.deepcopy(model), reward_fn=sentiment_score,
                         num_samples=2, max_new_tokens=24, show=1)
    assert result["win_rate"] == 0.5
    assert result["reward_policy"] == result["reward_reference"]
    assert result["kl"] == pytest.approx(0.0, abs=1e-5)
    assert len(result["samples"]) == 12 and all(s["policy"] == s["reference"] for s in result["samples"])


def test_sample_eval_peft_reference_is_the_base_model(model, tokenizer):
    """reference=None uses the PEFT policy with adapters disabled. A fresh LoRA adapter (B = 0) changes nothing,
    so win rate 1/2 and KL 0. A random adapter changes the policy, and reference=None then gives exactly what
    reference=<the base model> gives. A model without adapters and no reference is a clear error."""
    peft = pytest.importorskip("peft")
    prompts = ["the plot was", "i watched it", "the acting"]
    kwargs = dict(reward_fn=sentiment_score, num_samples=2, max_new_tokens=24, show=0)
    fresh = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    result = sample_eval(fresh, tokenizer, prompts, score=SCORE, **kwargs)
    assert result["win_rate"] == 0.5 and result["kl"] == pytest.approx(0.0, abs=1e-5)

    torch.manual_seed(0)
    changed = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                      init_lora_weights=False))
    with_none = sample_eval(changed, tokenizer, prompts, score=SCORE, **kwargs)
    with_base = sample_eval(changed, tokenizer, prompts, score=SCORE, reference=model, **kwargs)
    assert [s["reference"] for s in with_none["samples"]] == [s["reference"] for s in with_base["samples"]]
    assert with_none["kl"] == pytest.approx(with_base["kl"], abs=1e-4) and with_none["kl"] != pytest.approx(0.0, abs=1e-3)
    with pytest.raises(ValueError, match="not a PEFT model"):
        sample_eval(model, tokenizer, ["the plot was"], score=SCORE)


def test_sample_eval_kl_against_uniform_reference(model, tokenizer):
    """With a uniform reference, log pi_ref(y|x) = -len(y) * log V for each policy sample y, and the KL estimate
    is the mean of log pi(y|x) - log pi_ref(y|x); log pi(y|x) is recomputed from the text with a one-row forward."""
    prompts = ["the plot was", "i watched it", "the acting"]
    result = sample_eval(model, tokenizer, prompts, score=SCORE, reference=uniform_copy(model), num_samples=2, max_new_tokens=24,
                         show=0)
    log_v = math.log(model.config.vocab_size)
    for s in result["samples"]:
        assert s["reference_logp"] == pytest.approx(-s["policy_tokens"] * log_v, rel=1e-5)
        # The word-level tokenizer round-trips text exactly; decode drops the EOS, so add it back when it was sampled.
        ids = tokenizer(s["policy"], add_special_tokens=False)["input_ids"]
        ids += [tokenizer.eos_token_id] * (s["policy_tokens"] - len(ids))
        assert len(ids) == s["policy_tokens"]
        alone = sequence_logps(model, [tokenizer(s["prompt"])["input_ids"]], [ids], score=SCORE)[0]
        assert s["policy_logp"] == pytest.approx(alone, abs=1e-4)
    expected = sum(s["policy_logp"] + s["policy_tokens"] * log_v for s in result["samples"]) / 6
    assert result["kl"] == pytest.approx(expected, rel=1e-6)
