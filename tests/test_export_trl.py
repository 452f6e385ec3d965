"""`python dpo.py --export_trl`: every option the exported `trl dpo` command carries is accepted by TRL 1.16's own
parser (DPOConfig, ModelConfig, ScriptArguments) with the same value."""
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import dpo
from export_trl import export_trl_command

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
    cfg = dpo.parse_args(ARGV)
    command = export_trl_command(cfg, ARGV)
    script, training, model = trl_parse(command)
    assert model.model_name_or_path == cfg.model and script.dataset_name == cfg.dataset
    for name in ("beta", "learning_rate", "max_length", "truncation_mode", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "max_steps", "ld_alpha", "use_weighting",
                 "save_steps", "save_total_limit", "gradient_checkpointing", "num_train_epochs", "bf16",
                 "router_aux_loss_coef"):
        assert getattr(training, name) == getattr(cfg, name), name
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
