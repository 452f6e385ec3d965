"""The exported command, run: TRL 1.16's own DPO script (`trl dpo` runs trl/scripts/dpo.py under accelerate; with one
process that is the script's own `__main__` lines, run here in this process) and dpo.py on the same options, one CPU
process, a tiny random model, a local .jsonl file (eval held out) and a folder of splits. Both start at loss ln 2 (the
policy is the reference at step 1), take the same pairs per optimizer step and the same number of steps."""
import json
import math
import shlex

import pytest

import dpo
from harness.options import parse_args, cli
from harness.export_trl import export_trl_command
from tiny import make_model_dir, make_preference_dir

pytest.importorskip("trl")
pytestmark = pytest.mark.trl


def run_trl_script(command):
    """`trl dpo ...` with one process: the training script's own `__main__` block, without the launcher options."""
    from trl.scripts import dpo as trl_dpo

    words = shlex.split(command.splitlines()[0])
    launcher = {"--accelerate_config", "--num_processes"}
    args = [w for i, w in enumerate(words[2:], 2) if w not in launcher and words[i - 1] not in launcher]
    args += ["--report_to", "none"]  # this test's only addition: no experiment tracker
    parser = trl_dpo.make_parser()
    trl_dpo.main(*parser.parse_args_and_config(args, fail_with_unknown_args=False))


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_trl_script_runs_the_exported_command_like_dpo_py(tmp_path, layout):
    model = make_model_dir(tmp_path / "model")
    prefs = make_preference_dir(tmp_path / "prefs", n_train=20, n_test=4)
    dataset = f"{prefs}/train.jsonl" if layout == "file" else prefs  # file: 19 train + 1 held out; folder: 20 + 4
    options = ["--model", model, "--dataset", dataset, "--per_device_train_batch_size", "5",
               "--gradient_accumulation_steps", "2", "--logging_steps", "1", "--learning_rate", "1e-3",
               "--max_length", "64", "--bf16", "False"]  # bf16 off: a CPU (TRL's default bf16=True refuses one)
    argv = options + ["--output_dir", str(tmp_path / "trl"), "--export_trl", "--num_processes", "1"]
    command = export_trl_command(parse_args(argv), argv, num_processes=1)
    run_trl_script(command)
    cli(options + ["--output_dir", str(tmp_path / "ours"), "--show_examples", "0"], dpo.main)

    (checkpoint,) = (tmp_path / "trl").glob("checkpoint-*")  # transformers saves its state at the last step
    trl_log = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    ours = [json.loads(line) for line in (tmp_path / "ours" / "metrics.jsonl").read_text().splitlines()]
    trl_train = [r for r in trl_log if "loss" in r]
    our_train = [r for r in ours if "loss" in r]
    assert trl_train[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # (TRL rounds the logged loss to 4 digits)
    assert our_train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    # one epoch of 19 or 20 pairs at 10 pairs per step: 2 steps, half an epoch each, on both
    assert [r["step"] for r in trl_train] == [r["step"] for r in our_train] == [1, 2]
    assert [r["epoch"] for r in trl_train] == [r["epoch"] for r in our_train] == [0.5, 1.0]
    assert any("eval_loss" in r for r in trl_log) and any("eval_loss" in r for r in ours)  # the eval rows carried
