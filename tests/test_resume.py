"""Exact resume with any settings: after Ctrl-C (SIGINT) or a job scheduler's SIGTERM at any step, with any
logging_steps, eval_steps and gradient accumulation, the resumed run's metrics.jsonl equals the uninterrupted run's
line for line (timing aside), and its final weights are identical."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dpo
from harness import options
from harness.errors import RunError
from tiny import interrupt_at_loss_call, read_records, run_argv

ROOT = Path(__file__).resolve().parents[1]


def argv(tiny, out, *extra):
    return run_argv(tiny, out, "--logging_steps", "10", "--use_peft", "False", *extra)


def records(out):
    return read_records(out, timing=False)


def assert_same_run(straight, resumed):
    a, b = records(straight), records(resumed)
    assert [r["step"] for r in b] == [r["step"] for r in a]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        assert y == pytest.approx(x, abs=1e-6, rel=1e-6)
    final_a, final_b = load_file(Path(straight) / "model" / "model.safetensors"), load_file(Path(resumed) / "model" / "model.safetensors")
    for k, v in final_a.items():
        assert torch.equal(v, final_b[k]), k


@pytest.mark.parametrize("settings, loss_call, sig", [
    (["--logging_steps", "4", "--eval_steps", "3"], 6, signal.SIGINT),          # inside an open logging window
    (["--logging_steps", "10", "--gradient_accumulation_steps", "2"], 7, signal.SIGTERM),  # mid-accumulation
    (["--logging_steps", "3", "--eval_steps", "2", "--save_steps", "2"], 5, signal.SIGTERM),
], ids=["window-sigint", "accumulation-sigterm", "eval-save-sigterm"])
def test_resume_equals_an_uninterrupted_run(tiny, tmp_path, monkeypatch, settings, loss_call, sig):
    args = ["--max_steps", "9", *settings]
    dpo.main(options.parse_args(argv(tiny, tmp_path / "straight", *args)))
    interrupt_at_loss_call(monkeypatch, loss_call, sig)
    with pytest.raises(SystemExit, match=rf"interrupted \({signal.Signals(sig).name}\): saved"):
        dpo.main(options.parse_args(argv(tiny, tmp_path / "resumed", *args)))
    monkeypatch.undo()
    dpo.main(options.parse_args(argv(tiny, tmp_path / "resumed", *args, "--resume_from_checkpoint", "latest")))
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


def test_sigterm_to_the_cli_saves_and_the_resumed_run_is_exact(tiny, tmp_path):
    """What a job scheduler does: SIGTERM to `python dpo.py` while it trains; it finishes the step, saves, exits."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    args = ["--max_steps", "160", "--logging_steps", "7", "--eval_steps", "50", "--save_steps", "0"]
    cli = [sys.executable, str(ROOT / "dpo.py")]
    straight = subprocess.run(cli + argv(tiny, tmp_path / "straight", *args), capture_output=True, text=True, env=env, timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]
    run = subprocess.Popen(cli + argv(tiny, tmp_path / "resumed", *args), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=env)
    metrics = tmp_path / "resumed" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 1 and "interrupted (SIGTERM): saved" in stderr, stderr[-2000:]
    assert "Traceback" not in stderr
    (saved,) = (tmp_path / "resumed").glob("checkpoint-*")
    assert 14 <= int(saved.name.split("-")[1]) < 160
    resumed = subprocess.run(cli + argv(tiny, tmp_path / "resumed", *args, "--resume_from_checkpoint", "latest"),
                             capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


def test_a_changed_option_on_resume_is_refused_or_stated(tiny, tmp_path, capsys):
    """A longer --max_steps would rebuild the schedule for another length (the learning rate jumps): refused before
    any file is written, so config.json keeps what the run used. A new --learning_rate (what one lowers to resume
    past a divergence) is applied to the restored schedule, and --logging_steps too; both changes are said."""
    out = tmp_path / "run"
    dpo.main(options.parse_args(argv(tiny, out, "--max_steps", "4", "--save_steps", "2", "--logging_steps", "2")))
    before = (out / "config.json").read_text()
    with pytest.raises(RunError, match=r"--max_steps 8 \(the checkpoint was trained with 4\).*learning rate jump"):
        dpo.main(options.parse_args(argv(tiny, out, "--max_steps", "8", "--save_steps", "2", "--resume_from_checkpoint", "latest")))
    assert (out / "config.json").read_text() == before
    dpo.main(options.parse_args(argv(tiny, out, "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1",
                                 "--learning_rate", "5e-3", "--resume_from_checkpoint", str(out / "checkpoint-2"))))
    printed = capsys.readouterr().out
    assert "resume: --logging_steps changed from 2 to 1: applied from step 2 on" in printed
    assert "resume: --learning_rate changed from 0.01 to 0.005: applied from step 2 on" in printed
    config = json.loads((out / "config.json").read_text())
    assert (config["logging_steps"], config["learning_rate"]) == (1, 5e-3)
    lrs = [r["learning_rate"] for r in records(out) if "loss" in r]  # steps 2, 3, 4's rates: 3/4, 2/4, 1/4
    assert lrs == pytest.approx([1e-2 * 3 / 4, 5e-3 * 2 / 4, 5e-3 * 1 / 4])


def test_latest_after_a_rollback_and_an_interruption_continues_the_rollback(tiny, tmp_path, monkeypatch):
    """A run saves checkpoint-4, 6, 8 (--save_total_limit 3). Rolled back to checkpoint-4 at a lower learning
    rate, saving every step and keeping 2, it is interrupted in step 6: checkpoint-5 and 6 are its own,
    checkpoint-8 the abandoned run's. `--resume_from_checkpoint latest` must continue the rollback
    (checkpoint-6, not 8), and the run it makes must equal the rollback run uninterrupted; pruning must
    keep its checkpoint-5 over the stale 8."""
    out, straight = tmp_path / "run", tmp_path / "straight"
    first = ["--max_steps", "8", "--save_steps", "2", "--save_total_limit", "3", "--eval_steps", "100"]
    dpo.main(options.parse_args(argv(tiny, out, *first)))
    straight.mkdir()
    shutil.copytree(out / "checkpoint-4", straight / "checkpoint-4")  # the rollback, uninterrupted, elsewhere
    rollback = [*first[:2], "--save_steps", "1", "--save_total_limit", "2", "--eval_steps", "100",
                "--learning_rate", "5e-3"]
    dpo.main(options.parse_args(argv(tiny, straight, *rollback, "--resume_from_checkpoint",
                                     str(straight / "checkpoint-4"))))
    interrupt_at_loss_call(monkeypatch, 2)  # in step 6, the rollback's second
    with pytest.raises(SystemExit, match=r"interrupted \(SIGINT\): saved .*checkpoint-6"):
        dpo.main(options.parse_args(argv(tiny, out, *rollback, "--resume_from_checkpoint",
                                         str(out / "checkpoint-4"))))
    monkeypatch.undo()
    kept = sorted(p.name for p in out.glob("checkpoint-*"))
    assert kept == ["checkpoint-5", "checkpoint-6", "checkpoint-8"]
    dpo.main(options.parse_args(argv(tiny, out, *rollback, "--resume_from_checkpoint", "latest")))
    assert_same_run(straight, out)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-7", "checkpoint-8"]


def test_a_fresh_run_never_clobbers_a_used_output_dir(tiny, tmp_path):
    out = tmp_path / "run"
    dpo.main(options.parse_args(argv(tiny, out, "--max_steps", "4", "--save_steps", "2")))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(RunError, match="is not empty.*--overwrite_output_dir"):
        dpo.main(options.parse_args(argv(tiny, out, "--max_steps", "2")))
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    (out / "notes.txt").write_text("mine")
    dpo.main(options.parse_args(argv(tiny, out, "--max_steps", "2", "--overwrite_output_dir")))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == []  # the old run's checkpoints are gone
    assert [r["step"] for r in records(out) if "loss" in r] == [2]
    assert (out / "notes.txt").read_text() == "mine"  # only what a run writes is replaced


def test_non_finite_gradient_stops_before_the_weights_change(tiny, tmp_path, monkeypatch):
    """An inf gradient (the loss still finite) must not reach the optimizer: the run stops naming the step, and the
    named checkpoint holds finite weights."""
    real_backward = torch.Tensor.backward
    calls = {"n": 0}

    def poisoned_backward(self, *args, **kwargs):
        real_backward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            for p in model_ref["model"].parameters():
                if p.grad is not None:
                    p.grad.fill_(float("inf"))
                    break

    model_ref = {}
    real_load = dpo.load_model

    def load(*args, **kwargs):
        model = real_load(*args, **kwargs)
        model_ref.setdefault("model", model)
        return model

    monkeypatch.setattr(dpo, "load_model", load)
    monkeypatch.setattr(torch.Tensor, "backward", poisoned_backward)
    with pytest.raises(RunError, match=r"non-finite gradient norm \(inf\) at step 3.*checkpoint-2"):
        dpo.main(options.parse_args(argv(tiny, tmp_path, "--max_steps", "5", "--save_steps", "2")))
    weights = load_file(tmp_path / "checkpoint-2" / "trainable.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
