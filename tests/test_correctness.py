"""Correct numbers on the paths users take beyond the defaults: bf16 (run through CPU autocast, the same code path as
a GPU's), TR-DPO with tied embeddings, reference columns in the data, a reference cache after the weights change,
a reference with another vocabulary, sample_eval's prompts and reference, TRL's logging conventions, degenerate
data, and 4-bit parameter counts. Tiny random Llamas, nothing downloaded."""
import dataclasses
import json
import math
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file

import data
from harness import datafiles
import dpo
from harness.errors import OptionError, RunError
from harness import checks
from tiny import make_model_dir, make_preference_dir, make_tokenizer, read_records as records, run_config as config, WORDS

LN2 = math.log(2)


def assert_policy_is_reference(first):
    """h = 0 at step 1: the loss is -log sigmoid(0) = ln 2 and every reward is 0."""
    assert first["loss"] == pytest.approx(LN2, abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert first[key] == pytest.approx(0.0, abs=1e-6), key


# ---- bf16: the reference is the policy at step 0 -----------------------------------------------------------------

@pytest.mark.parametrize("mode", [
    ["--use_peft", "False"],                          # full fine-tuning: the frozen copy of fp32 masters
    [],                                               # LoRA: adapters off
    ["--use_peft", "False", "--ref_model", "MODEL"],  # an explicit reference with the policy's own weights
    ["--ref_model", "MODEL"],                         # LoRA with an explicit reference
    ["--load_in_4bit", "--ref_model", "MODEL"],       # QLoRA with an explicit (also 4-bit) reference
], ids=["full", "lora", "full+ref_model", "lora+ref_model", "qlora+ref_model"])
def test_bf16_autocast_first_step_is_ln2_in_every_mode(tiny, tmp_path, mode):
    """The bf16 code path (autocast over the policy's weights) on the CPU. A reference cast to bf16 while the
    policy keeps fp32 weights computes other numbers (norms and embeddings run outside autocast), so loss != ln 2."""
    mode = [tiny["model"] if m == "MODEL" else m for m in mode]
    cfg = config(tiny, tmp_path, "--max_steps", "1", "--bf16", "True", *mode)
    assert cfg.bf16
    dpo.main(cfg)
    assert_policy_is_reference(records(tmp_path)[0])


def test_qlora_gradients_are_the_same_after_an_evaluation(tiny):
    """On a CPU, bitsandbytes repacks 4-bit weights at the first eval-mode forward (an evaluation, or a frozen
    reference) for an inference kernel that has no backward; training after it got wrong LoRA gradients. load_model
    turns that repacking off: the gradients after an eval-mode forward equal those before."""
    cfg = config(tiny, "unused", "--load_in_4bit")
    batch = tiny_batch(tiny)
    grads = []
    for evaluate_first in (False, True):
        torch.manual_seed(0)  # the same LoRA A init
        model = dpo.load_model(cfg, tiny["model"], torch.device("cpu"), trainable=True)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.linspace(-0.1, 0.1, p.numel()).reshape(p.shape))  # gradients reach lora_A too
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                dpo.completion_logps(model, batch)
            model.train()
        dpo.completion_logps(model, batch)[0].sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=0, rtol=0)


def tiny_batch(tiny, n=4):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    train, _ = datafiles.load_preference_dataset(tiny["dataset"])
    return data.collate(data.prepare_dataset(train.select(range(n)), tokenizer, max_length=32, verbose=False),
                        data.pad_token_id(tokenizer), 32)


def test_tr_dpo_interpolates_in_the_master_dtype(tiny, tmp_path):
    """ref <- (1 - alpha) ref + alpha policy, exactly, in fp32 even under bf16 autocast: in bf16 most of an update at
    a small learning rate rounds away."""
    dpo.main(config(tiny, tmp_path, "--max_steps", "1", "--bf16", "True", "--use_peft", "False", "--sync_ref_model",
                    "--ref_model_sync_steps", "1", "--ref_model_mixup_alpha", "0.3", "--save_steps", "1",
                    "--learning_rate", "1e-5"))
    start = load_file(f"{tiny['model']}/model.safetensors")
    policy = load_file(tmp_path / "checkpoint-1" / "trainable.safetensors")
    ref = load_file(tmp_path / "checkpoint-1" / "ref_model.safetensors")
    moved = 0
    for name, p in policy.items():
        assert ref[name].dtype == torch.float32, name
        torch.testing.assert_close(ref[name], torch.lerp(start[name], p, 0.3), atol=0, rtol=0)
        moved += int((ref[name] != start[name]).sum())
    assert moved > 0.5 * sum(p.numel() for p in policy.values())  # most elements moved (bf16: 3-6%)


def test_tr_dpo_with_tied_embeddings_checkpoints_and_resumes_exactly(tiny, tmp_path):
    """Tied input/output embeddings share memory, which safetensors refuses to save twice; the reference is saved
    the way transformers saves such models, and a resumed run continues exactly."""
    model = make_model_dir(tmp_path / "tied", tie_word_embeddings=True)
    args = ("--model", model, "--max_steps", "3", "--use_peft", "False", "--sync_ref_model", "--ref_model_sync_steps",
            "1", "--save_steps", "1")
    dpo.main(config(tiny, tmp_path / "straight", *args))
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-1", tmp_path / "resumed" / "checkpoint-1")
    dpo.main(config(tiny, tmp_path / "resumed", *args, "--resume_from_checkpoint", "latest"))
    straight = [r for r in records(tmp_path / "straight") if r["step"] > 1]
    resumed = records(tmp_path / "resumed")
    for a, b in zip(straight, resumed, strict=True):
        assert {k: v for k, v in a.items() if k != "tokens_per_second"} == pytest.approx(
            {k: v for k, v in b.items() if k != "tokens_per_second"}, abs=1e-6)
    final_ref = load_file(tmp_path / "resumed" / "checkpoint-3" / "ref_model.safetensors")
    for k, v in load_file(tmp_path / "straight" / "checkpoint-3" / "ref_model.safetensors").items():
        assert torch.equal(v, final_ref[k]), k


# ---- reference log-probs from the data, and the precompute cache -------------------------------------------------

def dataset_with_reference_columns(tmp_path, chosen, rejected):
    folder = tmp_path / "with_ref"
    make_preference_dir(folder)
    for split in ("train", "test"):
        rows = [json.loads(l) for l in (folder / f"{split}.jsonl").read_text().splitlines()]
        for i, row in enumerate(rows):
            row["ref_chosen_logps"], row["ref_rejected_logps"] = chosen(i), rejected(i)
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


@pytest.mark.parametrize("mode", [[], ["--use_peft", "False"], ["--use_peft", "False", "--ref_model", "MODEL"]])
def test_reference_columns_are_ignored_without_precompute(tiny, tmp_path, capsys, mode):
    mode = [tiny["model"] if m == "MODEL" else m for m in mode]
    made_up = dataset_with_reference_columns(tmp_path, lambda i: -100.0, lambda i: 0.0)  # loss 72 if used
    dpo.main(config(tiny, tmp_path / "out", "--dataset", made_up, "--max_steps", "1", *mode))
    assert_policy_is_reference(records(tmp_path / "out")[0])
    assert "ref_chosen_logps/ref_rejected_logps columns are ignored" in capsys.readouterr().out


def test_reference_columns_are_used_with_precompute(tiny, tmp_path):
    """rewards/chosen = beta * (logps/chosen - ref_chosen_logps), with the data's constant reference values."""
    given = dataset_with_reference_columns(tmp_path, lambda i: -30.0, lambda i: -20.0)
    dpo.main(config(tiny, tmp_path / "out", "--dataset", given, "--max_steps", "1", "--precompute_ref_log_probs"))
    first = records(tmp_path / "out")[0]
    assert first["rewards/chosen"] == pytest.approx(0.1 * (first["logps/chosen"] + 30.0), rel=1e-5)
    assert first["rewards/rejected"] == pytest.approx(0.1 * (first["logps/rejected"] + 20.0), rel=1e-5)
    assert not list((tmp_path / "out").glob("ref_logps-*")), "nothing was computed, so nothing is cached"


@pytest.mark.parametrize("bad", [float("nan"), None])
def test_reference_columns_missing_or_non_finite_are_an_error(tiny, tmp_path, bad):
    given = dataset_with_reference_columns(tmp_path, lambda i: bad if i == 5 else -30.0, lambda i: -20.0)
    with pytest.raises(RunError, match="missing, non-numeric or non-finite ref_chosen_logps"):
        dpo.main(config(tiny, tmp_path / "out", "--dataset", given, "--max_steps", "1", "--precompute_ref_log_probs"))


def test_precompute_cache_follows_the_weights_not_the_path(tiny, tmp_path):
    """Iterative DPO writes new weights to the same path; the cached reference log-probs of the old weights must not
    be reused (they would give loss != ln 2 at step 1)."""
    path = tmp_path / "model"
    make_model_dir(path, seed=0)
    dpo.main(config(tiny, tmp_path / "out", "--model", str(path), "--max_steps", "1", "--precompute_ref_log_probs"))
    shutil.rmtree(path)
    make_model_dir(path, seed=1)  # new weights, same path
    dpo.main(config(tiny, tmp_path / "out", "--model", str(path), "--max_steps", "1", "--precompute_ref_log_probs",
                    "--overwrite_output_dir"))  # (the content-keyed cache survives the overwrite)
    assert_policy_is_reference(records(tmp_path / "out")[0])
    assert len(list((tmp_path / "out").glob("ref_logps-*.safetensors"))) == 2


# ---- a reference with another vocabulary ---------------------------------------------------------------------

@pytest.mark.parametrize("other", [
    dict(words=list(reversed(WORDS))),  # the same words under other ids
    dict(vocab_size=len(WORDS) + 4 + 8),  # the same tokenizer, a resized output layer
], ids=["tokenizer", "vocab_size"])
def test_ref_model_with_another_vocabulary_is_refused_before_loading(tiny, tmp_path, monkeypatch, other):
    ref = make_model_dir(tmp_path / "ref", **other)
    monkeypatch.setattr(dpo, "load_model", lambda *a, **k: pytest.fail("a model was loaded before the check"))
    with pytest.raises(RunError, match="vocabulary"):
        dpo.main(config(tiny, tmp_path / "out", "--ref_model", ref, "--max_steps", "1"))


# ---- sample_eval: the prompts trained on, the reference used --------------------------------------------------

def test_sample_eval_gets_the_trained_prompt_ids_and_the_runs_reference(tiny, tmp_path, monkeypatch):
    """Chat data: the prompts keep every special token of the template (they are the trained token ids, not
    decoded text re-tokenized), and with LoRA + --ref_model + precompute the sampled reference is --ref_model."""
    from demo import sample_eval

    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<user>", "<bot>"]})
    tokenizer.chat_template = ("{% for m in messages %}{{ '<user>' if m['role'] == 'user' else '<bot>' }} {{ m['content'] }}"
                               "{% if m['role'] == 'assistant' %}</s>{% endif %}{% endfor %}"
                               "{% if add_generation_prompt %}<bot>{% endif %}")
    model_dir = tmp_path / "chat"
    make_model_dir(model_dir, vocab_size=len(tokenizer))
    tokenizer.save_pretrained(model_dir)
    ref_dir = tmp_path / "chat_ref"
    make_model_dir(ref_dir, seed=3, vocab_size=len(tokenizer))
    tokenizer.save_pretrained(ref_dir)
    rows = [{"prompt": [{"role": "user", "content": "the movie was"}],
             "chosen": [{"role": "assistant", "content": w}], "rejected": [{"role": "assistant", "content": "bad"}]}
            for w in ("good", "great", "fine", "good very", "great great", "yes", "fine fine", "good good")]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = {}
    monkeypatch.setattr(sample_eval, "sample_eval", lambda policy, tok, prompts, reference=None, **k: seen.update(
        prompts=prompts, reference=reference) or {})
    dpo.main(config(tiny, tmp_path / "out", "--model", str(model_dir), "--dataset", str(tmp_path / "chat.jsonl"),
                    "--eval_fraction", "0.25", "--max_steps", "1", "--sample_eval", "2", "--ref_model", str(ref_dir),
                    "--precompute_ref_log_probs"))
    expected = tokenizer.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
    assert seen["prompts"][0] == list(expected)
    assert {tokenizer.convert_tokens_to_ids("<user>"), tokenizer.convert_tokens_to_ids("<bot>")} <= set(seen["prompts"][0])
    ref_weights = load_file(ref_dir / "model.safetensors")
    assert torch.equal(seen["reference"].model.embed_tokens.weight, ref_weights["model.embed_tokens.weight"])
    assert sample_eval._prompt_ids(tokenizer, seen["prompts"][0]) == seen["prompts"][0]


# ---- logging as TRL does ------------------------------------------------------------------------------------------

def test_learning_rate_is_logged_as_the_rate_the_step_used(tiny, tmp_path):
    """TRL logs the rate read before the scheduler steps, the one the step used: with 2 warmup steps, 0, 1/2,
    1 times the peak (tests/test_lr_trl_parity.py compares with TRL's own log)."""
    dpo.main(config(tiny, tmp_path, "--max_steps", "3", "--warmup_steps", "2", "--lr_scheduler_type", "constant"))
    assert [r["learning_rate"] for r in records(tmp_path) if "loss" in r] == pytest.approx([0.0, 5e-3, 1e-2])


def test_eval_loss_is_a_mean_over_pairs_whatever_the_batch_size(tiny):
    """32 held-out pairs in batches of 5 (the last has 2) give the same eval_loss as batches of 1."""
    from transformers import AutoTokenizer

    cfg = config(tiny, "unused")
    model = dpo.load_model(cfg, tiny["model"], torch.device("cpu"), trainable=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # pairs now have different losses
    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    _, eval_rows = datafiles.load_preference_dataset(tiny["dataset"])
    eval_set = data.prepare_dataset(eval_rows, tokenizer, max_length=32, verbose=False)
    no_autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    by_pair = dpo.evaluate(dataclasses.replace(cfg, per_device_eval_batch_size=1), model, None, eval_set, 0, no_autocast)
    by_five = dpo.evaluate(dataclasses.replace(cfg, per_device_eval_batch_size=5), model, None, eval_set, 0, no_autocast)
    assert by_five["eval_loss"] == pytest.approx(by_pair["eval_loss"], abs=1e-6)


def test_tokens_per_second_counts_training_time_only(tiny, tmp_path, monkeypatch):
    """Evaluation that takes 1000 s (a fake clock) does not slow the training throughput that is logged."""
    clock = {"offset": 0.0}
    real_time, real_evaluate = time.time, dpo.evaluate

    def slow_evaluate(*args, **kwargs):
        clock["offset"] += 1000.0
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(time, "time", lambda: real_time() + clock["offset"])
    monkeypatch.setattr(dpo, "evaluate", slow_evaluate)
    dpo.main(config(tiny, tmp_path, "--max_steps", "4", "--eval_steps", "1"))
    rates = [r["tokens_per_second"] for r in records(tmp_path) if "loss" in r]
    assert len(rates) == 4 and min(rates) > 10  # ~80 tokens a step; counting a 1000 s evaluation would give < 0.1


def test_learning_rate_zero_is_zero(tiny, tmp_path):
    cfg = config(tiny, tmp_path, "--learning_rate", "0", "--max_steps", "2", "--use_peft", "False", "--save_steps", "2")
    assert cfg.learning_rate == 0
    dpo.main(cfg)
    start = load_file(f"{tiny['model']}/model.safetensors")
    for k, v in load_file(tmp_path / "checkpoint-2" / "trainable.safetensors").items():
        assert torch.equal(v, start[k]), k


# ---- degenerate data ---------------------------------------------------------------------------------------------

def test_whitespace_only_completions_are_dropped_and_counted():
    """'   ' and an EOS-only completion leave nothing to prefer: dropped and counted as empty completions."""
    rows = [{"prompt": "the movie was", "chosen": " good", "rejected": " bad"},
            {"prompt": "the movie was", "chosen": "   ", "rejected": " bad"},
            {"prompt": "the movie was", "chosen": " good", "rejected": " </s>"},
            {"prompt": "the movie was", "chosen": " <pad>", "rejected": " bad"}]
    counts = {}
    examples = data.prepare_dataset(rows, make_tokenizer(), max_length=32, counts=counts, verbose=False)
    assert len(examples) == 1 and counts["empty_completion"] == 3


def test_max_length_that_scores_no_token_is_an_error_before_the_model_loads(tiny, tmp_path, monkeypatch):
    """With max_length 1 a row keeps one token, and the first token of a row has nothing to predict it: no token is
    scored, every gradient would be 0."""
    counts = {}
    with pytest.raises(ValueError, match="were dropped.*no completion token to score.*raise max_length"):
        data.prepare_dataset([{"prompt": "the movie was", "chosen": " good", "rejected": " bad"}], make_tokenizer(),
                             max_length=1, counts=counts, verbose=False)
    with pytest.raises(OptionError, match="--max_length must be >= 2"):  # the CLI refuses it as an option
        config(tiny, tmp_path, "--max_length", "1", "--max_steps", "1")


def test_max_length_two_scores_one_token_per_sequence():
    examples = data.prepare_dataset([{"prompt": "the movie was", "chosen": " good", "rejected": " bad"}],
                                    make_tokenizer(), max_length=2, verbose=False)
    batch = data.collate(examples, 0, 2)
    assert batch["completion_mask"][:, 1:].sum(1).tolist() == [1, 1]


# ---- parameter counts under 4-bit quantisation --------------------------------------------------------------------

def test_parameter_count_is_the_same_in_4bit(tiny):
    cfg = config(tiny, "unused")
    full = dpo.load_model(cfg, tiny["model"], torch.device("cpu"), trainable=True)
    cfg4 = config(tiny, "unused", "--load_in_4bit")
    quantized = dpo.load_model(cfg4, tiny["model"], torch.device("cpu"), trainable=True)
    assert sum(p.numel() for p in quantized.parameters()) < sum(p.numel() for p in full.parameters())  # packed
    assert checks.count_parameters(quantized) == checks.count_parameters(full) == sum(p.numel() for p in full.parameters())
