"""The trainer, end to end, on a tiny random Llama and a small learnable preference set (CPU, nothing downloaded)."""
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import checkpoints
import data
from harness import datafiles
import dpo
from harness import options
from harness.errors import RunError
import losses
from tiny import interrupt_at_loss_call, read_records as records, run_config as config

ROOT = Path(__file__).resolve().parents[1]
LN2 = math.log(2)


def train_losses(out):
    return [r["loss"] for r in records(out) if "loss" in r]


@pytest.mark.parametrize("mode", [
    [],                                                   # LoRA: the policy with adapters off
    ["--use_peft", "False"],                              # full fine-tuning: a frozen copy of the policy
    ["--use_peft", "False", "--ref_model", "MODEL"],      # an explicit reference model (the same weights)
    ["--precompute_ref_log_probs"],                       # reference log-probs computed before training
    ["--use_peft", "False", "--sync_ref_model", "--ref_model_sync_steps", "1"],  # TR-DPO
])
def test_first_step_loss_is_ln2_and_rewards_zero_in_every_reference_mode(tiny, tmp_path, mode):
    """At step 1 the policy equals the reference, so h = 0 and -log sigmoid(0) = ln 2; every reward is 0 and the
    strict accuracy (chosen reward > rejected reward) is 0."""
    mode = [tiny["model"] if m == "MODEL" else m for m in mode]
    dpo.main(config(tiny, tmp_path, "--max_steps", "1", *mode))
    first = records(tmp_path)[0]
    assert first["loss"] == pytest.approx(LN2, abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert first[key] == pytest.approx(0.0, abs=1e-6), key


def test_reference_free_rewards_are_beta_times_policy_logps(tiny, tmp_path):
    """With reference_free the reference log-probs are 0, so rewards/chosen = beta * logps/chosen."""
    dpo.main(config(tiny, tmp_path, "--max_steps", "1", "--reference_free", "--beta", "0.5"))
    first = records(tmp_path)[0]
    assert first["rewards/chosen"] == pytest.approx(0.5 * first["logps/chosen"], rel=1e-5)
    assert first["rewards/rejected"] == pytest.approx(0.5 * first["logps/rejected"], rel=1e-5)


def tiny_batch(tiny, n=4):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    train, _ = datafiles.load_preference_dataset(tiny["dataset"])
    examples = data.prepare_dataset(train.select(range(n)), tokenizer, max_length=32, verbose=False)
    return data.collate(examples, data.pad_token_id(tokenizer), 32)


def test_chunked_logps_equal_naive_log_softmax_values_and_gradients(tiny):
    """gather - logsumexp at completion positions only, in chunks of 3 tokens, equals the full log_softmax."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32)
    batch = tiny_batch(tiny)
    naive = dpo.completion_logps_naive(model, batch)
    naive.sum().backward()
    naive_grad = model.model.layers[0].mlp.up_proj.weight.grad.clone()
    model.zero_grad()
    chunked, stats = dpo.completion_logps(model, batch, with_wpo=True, chunk_tokens=3)
    chunked.sum().backward()
    torch.testing.assert_close(chunked, naive, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.model.layers[0].mlp.up_proj.weight.grad, naive_grad, atol=1e-5, rtol=1e-5)
    # logits/* metric input: the vocabulary-mean logit summed over each row's completion tokens
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()
    expected = (logits.mean(-1) * batch["completion_mask"][:, 1:]).sum(1)
    torch.testing.assert_close(stats["logits_sum"], expected.detach(), atol=1e-5, rtol=1e-5)
    # WPO input: log sum_v p_v^2 at a completion position
    row, pos = batch["completion_mask"][:, 1:].nonzero()[0].tolist()
    p = torch.softmax(logits[row, pos].detach(), -1)
    assert float(stats["log_sum_sq"][row, pos]) == pytest.approx(float(torch.log((p ** 2).sum())), abs=1e-5)


def test_adapter_disabled_reference_equals_a_separate_frozen_copy(tiny):
    """LoRA's reference (adapters off) scores exactly like a separately loaded base model, even after the adapter
    has moved away from zero."""
    cfg = options.parse_args(["--model", tiny["model"], "--dataset", tiny["dataset"], "--output_dir", "unused"])
    model = dpo.load_model(cfg, tiny["model"], torch.device("cpu"), trainable=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # the adapter now changes the outputs
    frozen = dpo.load_model(cfg, tiny["model"], torch.device("cpu"), trainable=False)
    batch = tiny_batch(tiny)
    with dpo.reference(model, None) as ref:
        adapter_off = dpo.completion_logps(ref, batch)[0]
    with dpo.reference(model, frozen) as ref:
        separate = dpo.completion_logps(ref, batch)[0]
    policy = dpo.completion_logps(model, batch)[0]
    torch.testing.assert_close(adapter_off, separate, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(policy, separate, atol=1e-3)


def test_precomputed_reference_gives_the_same_loss_trajectory(tiny, tmp_path):
    dpo.main(config(tiny, tmp_path / "live", "--max_steps", "4"))
    dpo.main(config(tiny, tmp_path / "pre", "--max_steps", "4", "--precompute_ref_log_probs"))
    assert train_losses(tmp_path / "pre") == pytest.approx(train_losses(tmp_path / "live"), abs=1e-5)
    assert list((tmp_path / "pre").glob("ref_logps-*.safetensors")), "the reference log-probs are cached"


def test_gradient_accumulation_k_micro_batches_equal_one_batch_k_times_larger(tiny, tmp_path):
    """Batch 4 x 1 and batch 2 x accumulation 2 see the same pairs per step; the loss is a mean over pairs, so the
    summed gradients and every step's loss agree."""
    dpo.main(config(tiny, tmp_path / "big", "--max_steps", "3", "--use_peft", "False"))
    dpo.main(config(tiny, tmp_path / "acc", "--max_steps", "3", "--use_peft", "False",
                    "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"))
    assert train_losses(tmp_path / "acc") == pytest.approx(train_losses(tmp_path / "big"), abs=1e-5)
    grad = [r["grad_norm"] for r in records(tmp_path / "acc") if "grad_norm" in r]
    assert grad == pytest.approx([r["grad_norm"] for r in records(tmp_path / "big") if "grad_norm" in r], rel=1e-4)


def test_learns_the_preference_held_out_accuracy_above_0_9(tiny, tmp_path):
    dpo.main(config(tiny, tmp_path, "--num_train_epochs", "4", "--logging_steps", "8"))
    final = [r for r in records(tmp_path) if "eval_rewards/accuracies" in r][-1]
    assert final["eval_rewards/accuracies"] > 0.9
    assert final["eval_rewards/margins"] > 0
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert json.loads((tmp_path / "config.json").read_text())["beta"] == 0.1


def test_qlora_on_cpu_trains_only_lora_and_the_saved_adapter_reloads(tiny, tmp_path):
    """4-bit NF4 base + LoRA on the CPU: after training, every base weight (the packed 4-bit ones included) is
    bit-identical to a fresh load, LoRA B has left its zero init, and the adapter saved in output_dir/model reloads
    into a model whose held-out loss equals the one the run logged."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer, BitsAndBytesConfig

    cfg = config(tiny, tmp_path, "--max_steps", "3", "--load_in_4bit")
    fresh = dpo.load_model(cfg, cfg.model, torch.device("cpu"), trainable=True).state_dict()
    assert any(".absmax" in k or "quant_state" in k for k in fresh), "the base is really 4-bit"
    dpo.main(cfg)
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    trained = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "model", quantization_config=nf4,
                                                       dtype=torch.float32, device_map={"": "cpu"})
    after = trained.state_dict()
    for k, v in fresh.items():
        if "lora_" not in k:
            assert torch.equal(v, after[k]), k
        elif "lora_B" in k:
            assert not torch.equal(v, after[k]), f"{k} did not train"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    _, eval_rows = datafiles.load_preference_dataset(tiny["dataset"])
    eval_set = data.prepare_dataset(eval_rows, tokenizer, max_length=32, verbose=False)
    reloaded = dpo.evaluate(cfg, trained, None, eval_set, data.pad_token_id(tokenizer), lambda: torch.autocast("cpu", enabled=False))
    logged = [r for r in records(tmp_path) if "eval_loss" in r][-1]
    assert reloaded["eval_loss"] == pytest.approx(logged["eval_loss"], abs=1e-5)


def test_interrupt_and_resume_equals_an_uninterrupted_run(tiny, tmp_path, monkeypatch):
    args = ("--max_steps", "6", "--use_peft", "False", "--save_steps", "100", "--eval_steps", "3")
    dpo.main(config(tiny, tmp_path / "straight", *args))
    interrupt_at_loss_call(monkeypatch, 3)  # Ctrl-C during step 3: the step finishes, a checkpoint is saved
    with pytest.raises(SystemExit, match=r"interrupted \(SIGINT\): saved .*checkpoint-3"):
        dpo.main(config(tiny, tmp_path / "resumed", *args))
    monkeypatch.undo()
    dpo.main(config(tiny, tmp_path / "resumed", *args, "--resume_from_checkpoint", "latest"))
    strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in rs]  # noqa: E731
    straight, resumed = strip(records(tmp_path / "straight")), strip(records(tmp_path / "resumed"))
    assert len(resumed) == len(straight)
    for a, b in zip(straight, resumed):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], abs=1e-6), k


def test_a_checkpoint_is_never_half_written(tiny, tmp_path, monkeypatch):
    """A failure while writing removes the .tmp folder (a killed process leaves it, and `latest` never picks it)."""
    cfg = config(tiny, tmp_path, "--max_steps", "4", "--save_steps", "2", "--use_peft", "False")
    real = checkpoints.save_file

    def failing(tensors, filename, *a, **k):
        if "checkpoint-4" in str(filename) and "rng" in str(filename):
            raise OSError("disk full")
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(checkpoints, "save_file", failing)
    with pytest.raises(checkpoints.CheckpointError, match="could not write .*checkpoint-4.*disk full.*intact checkpoint is .*checkpoint-2"):
        dpo.main(cfg)
    assert (tmp_path / "checkpoint-2").is_dir() and not (tmp_path / "checkpoint-4").exists()
    assert not list(tmp_path.glob(".tmp-*"))
    assert checkpoints.find_checkpoint(tmp_path, "latest").name == "checkpoint-2"


def test_non_finite_loss_stops_with_the_last_checkpoint_intact(tiny, tmp_path, monkeypatch):
    real = losses.dpo_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        return (out[0] * float("nan"),) + out[1:] if calls["n"] == 3 else out

    monkeypatch.setattr(losses, "dpo_loss", poisoned)
    with pytest.raises(RunError, match=r"non-finite loss \(nan\) at step 3.*checkpoint-2"):
        dpo.main(config(tiny, tmp_path, "--max_steps", "5", "--save_steps", "2"))
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    monkeypatch.undo()
    dpo.main(config(tiny, tmp_path, "--max_steps", "5", "--save_steps", "2", "--resume_from_checkpoint", "latest"))


@pytest.mark.parametrize("argv, message", [
    (["--precompute_ref_log_probs", "--sync_ref_model", "--use_peft", "False"], "cannot be precomputed"),
    (["--load_in_4bit", "--use_peft", "False"], "--load_in_4bit trains adapters"),
    (["--loss_type", "sigmoid", "nonsense"], "nonsense"),
    (["--loss_type", "bco_pair", "--f_divergence_type", "js_divergence"], "bco_pair"),
    (["--sync_ref_model"], "--sync_ref_model needs a separate reference"),
    (["--truncation_mode", "middle"], "keep_end or keep_start"),
    (["--optim", "sgd"], "--optim must be"),
])
def test_contradictory_options_fail_before_any_model_is_loaded(argv, message):
    with pytest.raises((SystemExit, ValueError), match=message):
        options.parse_args(["--model", "does/not-exist", "--dataset", "missing.jsonl", *argv])


def test_a_checkpoint_with_a_pickled_object_is_refused_not_executed(tiny, tmp_path):
    """Even with a manifest that matches it (an attacker can write both), the pickled object is never run."""
    dpo.main(config(tiny, tmp_path, "--max_steps", "2", "--save_steps", "2"))
    marker, folder = tmp_path / "pwned", tmp_path / "checkpoint-2"
    torch.save({"optimizer": Exploit(str(marker)), "scheduler": {}}, folder / "optimizer.pt")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["optimizer.pt"] = {"size": (folder / "optimizer.pt").stat().st_size,
                                         "sha256": hashlib.sha256((folder / "optimizer.pt").read_bytes()).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(checkpoints.CheckpointError, match="refusing .*optimizer.pt: it holds more than tensors and plain data"):
        dpo.main(config(tiny, tmp_path, "--max_steps", "2", "--save_steps", "2", "--resume_from_checkpoint", "latest"))
    assert not marker.exists()


class Exploit:
    """Unpickling this with weights_only=False would create a file: the code a malicious checkpoint could run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("mode", [["--use_peft", "False"], [], ["--load_in_4bit"]], ids=["full", "lora", "qlora"])
def test_cli_smoke(tiny, tmp_path, mode):
    run = subprocess.run([sys.executable, str(ROOT / "dpo.py"), "--model", tiny["model"], "--dataset", tiny["dataset"],
                          "--output_dir", str(tmp_path), "--max_steps", "2", "--max_length", "32", "--logging_steps", "1",
                          *mode], capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "eval_loss=" in run.stdout
    assert (tmp_path / "model").is_dir() and (tmp_path / "config.json").is_file()
    for notice in ("gemm_4bit_forward", "is_gradient_checkpointing"):  # library notices, not about the run
        assert notice not in run.stderr, run.stderr[-2000:]


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_lr_schedule_equals_transformers_get_scheduler(schedule, warmup):
    """dpo.lr_factor writes out transformers' formulas (constant = its constant_with_warmup): the same learning rate
    at every step, to the last bit, over 10 steps and past the end."""
    from transformers import get_scheduler

    def rates(make):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        scheduler, out = make(optimizer), []
        for _ in range(12):
            out.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return out

    ours = rates(lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: dpo.lr_factor(schedule, s, warmup, 10)))
    theirs = rates(lambda o: get_scheduler({"constant": "constant_with_warmup"}.get(schedule, schedule), o,
                                           num_warmup_steps=warmup, num_training_steps=10))
    assert ours == theirs


def test_full_fine_tuning_imports_neither_peft_nor_bitsandbytes(tiny, tmp_path):
    """Full fine-tuning needs no adapters and no 4-bit layers; importing them (transformers' trainer utilities
    would) costs ~170 MiB of memory and seconds of start-up."""
    code = ("import sys, dpo; from harness import options; dpo.main(options.parse_args(sys.argv[1:])); "
            "print('imported:', [m for m in ('peft', 'bitsandbytes', 'transformers.optimization') if m in sys.modules])")
    run = subprocess.run([sys.executable, "-c", code, "--model", tiny["model"], "--dataset", tiny["dataset"],
                          "--output_dir", str(tmp_path), "--max_steps", "1", "--max_length", "32", "--use_peft", "False",
                          "--show_examples", "0"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "imported: []" in run.stdout, run.stdout[-500:]


def test_disable_dropout_also_zeroes_the_attention_dropout_rate(tmp_path):
    """Llama passes config.attention_dropout to SDPA as a float, not through an nn.Dropout: with it at 0.1, two
    train-mode forwards differ; after --disable_dropout (the default) they are identical."""
    from tiny import make_model_dir

    path = make_model_dir(tmp_path / "model", attention_dropout=0.1)
    ids = torch.arange(3, 19)[None]
    for disable, same in ((False, False), (True, True)):
        cfg = config({"model": path, "dataset": path}, tmp_path / "out", "--use_peft", "False",
                     "--disable_dropout", str(disable), "--bf16", "False")
        model = dpo.load_model(cfg, path, torch.device("cpu"), trainable=True)
        with torch.no_grad():
            first, second = (model(input_ids=ids).logits for _ in range(2))
        assert torch.equal(first, second) == same
