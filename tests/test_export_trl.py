"""`python dpo.py --export_trl`: every option the exported `trl dpo` command carries is accepted by TRL 1.16's own
parser (DPOConfig, ModelConfig, ScriptArguments) with the same value; the batch is split over N processes so that the
global batch stays this run's; local data is written as the rows this run uses; every Config field is accounted for;
and TRL's own script, run on the exported options, trains the same number of steps on the same pairs per step."""
import dataclasses
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from harness import datafiles
import dpo
from harness import options
from harness import export_trl
from harness.export_trl import batch_plan, export_trl_command
from tiny import make_preference_dir

pytestmark = pytest.mark.trl
pytest.importorskip("trl")
ROOT = Path(__file__).resolve().parents[1]


def trl_parse(command):
    """Parse the command's training arguments exactly as `trl dpo` would (launcher options removed)."""
    from trl import DPOConfig, ModelConfig, ScriptArguments, TrlParser

    words = shlex.split(command.splitlines()[0])
    assert words[:2] == ["trl", "dpo"]
    launcher = {"--accelerate_config", "--num_processes"}
    args = [w for i, w in enumerate(words[2:], 2) if w not in launcher and words[i - 1] not in launcher]
    script, training, model = TrlParser((ScriptArguments, DPOConfig, ModelConfig)).parse_args_into_dataclasses(args)
    return script, training, model


ARGV = ["--model", "Qwen/Qwen2.5-0.5B-Instruct", "--dataset", "trl-lib/ultrafeedback_binarized",
        "--output_dir", "out", "--beta", "0.05", "--loss_type", "sigmoid", "bco_pair", "--loss_weights", "0.8", "0.2",
        "--learning_rate", "5e-6", "--max_length", "512", "--truncation_mode", "keep_start",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "8", "--lr_scheduler_type", "cosine",
        "--warmup_ratio", "0.1", "--max_steps", "100", "--ld_alpha", "0.5", "--use_weighting",
        "--lora_r", "32", "--lora_alpha", "16", "--eval_steps", "50", "--save_steps", "25", "--save_total_limit", "2",
        "--rpo_alpha", "0.5", "--max_prompt_length", "256", "--gradient_checkpointing", "--load_in_4bit",
        "--router_aux_loss_coef", "0.01", "--bf16", "False"]  # TRL's DPOConfig refuses its default bf16=True on a machine without a GPU, like this one


def test_trl_accepts_every_exported_option_with_the_same_value():
    cfg = options.parse_args(ARGV)
    command = export_trl_command(cfg, ARGV)
    script, training, model = trl_parse(command)
    assert model.model_name_or_path == cfg.model and script.dataset_name == cfg.dataset
    for name in ("beta", "learning_rate", "max_length", "truncation_mode", "max_steps", "ld_alpha", "use_weighting",
                 "save_steps", "save_total_limit", "gradient_checkpointing", "num_train_epochs", "bf16",
                 "router_aux_loss_coef"):
        assert getattr(training, name) == getattr(cfg, name), name
    # 8 processes share this run's 2 x 8 = 16 pairs per step: 2 each, no accumulation
    assert (training.per_device_train_batch_size, training.gradient_accumulation_steps) == (2, 1)
    assert getattr(training.lr_scheduler_type, "value", training.lr_scheduler_type) == "cosine" and training.eval_steps == 50
    assert training.warmup_steps == cfg.warmup_ratio  # transformers 5 reads a float < 1 as the warmup ratio
    assert getattr(training.optim, "value", training.optim) == cfg.optim
    # rpo_alpha has an exact TRL form: one more loss term, the NLL, weighted alpha
    assert training.loss_type == ["sigmoid", "bco_pair", "sft"] and training.loss_weights == [0.8, 0.2, 0.5]
    assert model.use_peft and model.lora_r == 32 and model.lora_alpha == 16 and model.load_in_4bit
    assert model.bnb_4bit_quant_type == "nf4" and model.use_bnb_nested_quant
    # what TRL lacks is listed with what to do instead, not silently dropped
    assert "--max_prompt_length" in command and "pre-truncate" in command


def test_export_is_a_dpo_py_option():
    run = subprocess.run([sys.executable, str(ROOT / "dpo.py"), "--export_trl", "--model", "m", "--dataset", "d",
                          "--reference_free"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("trl dpo --accelerate_config multi_gpu") and "--reference_free" in run.stdout


def test_batch_plan_keeps_the_global_batch():
    assert batch_plan(16, 2, 8) == (2, 1, None)  # 2 x 8 on one GPU -> 8 x 2 x 1
    assert batch_plan(64, 4, 8) == (4, 2, None)  # the per-device batch never grows past what fitted one GPU
    assert batch_plan(8, 8, 8) == (1, 1, None)
    assert batch_plan(12, 4, 1) == (4, 3, None)  # one process: the run itself
    assert batch_plan(12, 3, 8)[:2] == (2, 1) and "16 pairs per step, not 12" in batch_plan(12, 3, 8)[2]


def test_a_batch_that_does_not_split_is_a_warning_line():
    per_device, accumulation, warning = batch_plan(16, 2, 3)
    assert 3 * per_device * accumulation == 15  # the nearest global batch
    assert "15 pairs per step, not 16" in warning and "--num_processes 2 or 4 (a divisor of 16)" in warning
    command = export_trl_command(options.parse_args(ARGV), ARGV, num_processes=3)
    assert "\n# warning: 16 pairs per step" in command


def test_every_config_field_is_mapped_listed_or_ignored():
    """A new Config field must be added to one of these, or --export_trl would drop it without a word."""
    kinds = [set(export_trl.SAME), set(export_trl.RENAMED), export_trl.COMPUTED, set(export_trl.OURS_ONLY),
             set(export_trl.NO_EFFECT)]
    fields = {f.name for f in dataclasses.fields(dpo.Config)}
    assert fields == set().union(*kinds), f"unclassified: {sorted(fields - set().union(*kinds))}"
    assert sum(map(len, kinds)) == len(fields), "a field is in two of them"


def _rows(dataset):
    return [dict(r) for r in dataset]


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_local_data_is_written_as_the_rows_this_run_uses(tmp_path, layout):
    import datasets

    prefs = make_preference_dir(tmp_path / "prefs", n_train=40, n_test=6)
    dataset = f"{prefs}/train.jsonl" if layout == "file" else prefs
    argv = ["--model", "m", "--dataset", dataset, "--output_dir", str(tmp_path / "out"), "--bf16", "False"]
    cfg = options.parse_args(argv)
    words = shlex.split(export_trl_command(cfg, argv).splitlines()[0])
    assert words[words.index("--dataset_name") + 1] == str(tmp_path / "out" / "trl_dataset")
    train, evaluation = datafiles.load_preference_dataset(dataset, seed=cfg.seed)  # held out (file) or the test split
    trl_view = datasets.load_dataset(str(tmp_path / "out" / "trl_dataset"))  # what TRL's script loads
    assert _rows(trl_view["train"]) == _rows(train) and _rows(trl_view["test"]) == _rows(evaluation)
    assert len(evaluation) == (2 if layout == "file" else 6)
    assert words[words.index("--eval_strategy") + 1] == "steps"  # else TRL's script drops the eval rows
