"""Everything around a run that is not DPO: options checked before anything loads, the rules of the output folder
and of resuming, and the errors a user can act on. dpo.py calls it at the edges; a reader of the algorithm can
skip this file.

A user error is one line on stderr, `dpo.py: error: <what was wrong>, <where>, <what to do>`, with exit code 2 for
options (OptionError) and 1 for data, files and faults (RunError, data.DataError, checkpoints.CheckpointError).
"""
import json
import math
import shutil
from pathlib import Path


class OptionError(ValueError):
    """An option out of range or contradicting another (exit code 2)."""


class RunError(RuntimeError):
    """A fault the user can act on: a missing file, a used output folder, a non-finite step (exit code 1)."""


# ----------------------------------------------------------------------------------------------------------------
# Options


# Each option's range, checked before the tokenizer loads: (option, is the value valid?, what it must be).
RANGES = [
    ("beta", lambda v: v > 0, "> 0 (the KL strength; at 0 the preference has no effect)"),
    ("learning_rate", lambda v: v >= 0, ">= 0"),
    ("max_length", lambda v: v >= 2, ">= 2 (a sequence's first token is never scored)"),
    ("max_prompt_length", lambda v: v is None or v >= 1, ">= 1"),
    ("max_completion_length", lambda v: v is None or v >= 1, ">= 1"),
    ("pad_to_multiple_of", lambda v: v is None or v >= 1, ">= 1"),
    ("per_device_train_batch_size", lambda v: v >= 1, ">= 1"),
    ("per_device_eval_batch_size", lambda v: v >= 1, ">= 1"),
    ("gradient_accumulation_steps", lambda v: v >= 1, ">= 1"),
    ("num_train_epochs", lambda v: v > 0, "> 0"),
    ("max_steps", lambda v: v == -1 or v >= 1, ">= 1, or -1 for num_train_epochs"),
    ("warmup_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("warmup_steps", lambda v: v >= 0, ">= 0"),
    ("max_grad_norm", lambda v: v >= 0, ">= 0 (0: no clipping)"),
    ("weight_decay", lambda v: v >= 0, ">= 0"),
    ("eval_fraction", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("ref_model_mixup_alpha", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("ref_model_sync_steps", lambda v: v >= 1, ">= 1"),
    ("lora_r", lambda v: v >= 1, ">= 1"),
    ("lora_alpha", lambda v: v > 0, "> 0"),
    ("lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("logging_steps", lambda v: v >= 1, ">= 1"),
    ("eval_steps", lambda v: v is None or v >= 1, ">= 1"),
    ("save_steps", lambda v: v >= 0, ">= 0 (0: only on Ctrl-C/SIGTERM)"),
    ("save_total_limit", lambda v: v is None or v >= 1, ">= 1"),
    ("sample_eval", lambda v: v >= 0, ">= 0"),
    ("show_examples", lambda v: v >= 0, ">= 0"),
    ("cpu_threads", lambda v: v is None or v >= 1, ">= 1"),
    ("router_aux_loss_coef", lambda v: v is None or v >= 0, ">= 0"),
]


def check_options(cfg, problems: list[str]):
    """Every option's range and every contradiction, all reported in one message (OptionError)."""
    for name, valid, must_be in RANGES:
        value = getattr(cfg, name)
        if isinstance(value, float) and not math.isfinite(value) or not valid(value):
            problems.append(f"--{name} must be {must_be}, got {value}")
    if cfg.load_in_4bit and not cfg.use_peft:
        problems.append("--load_in_4bit trains adapters on a frozen 4-bit base: add --use_peft True (4-bit weights cannot be trained)")
    if cfg.sync_ref_model and cfg.precompute_ref_log_probs:
        problems.append("--sync_ref_model changes the reference during training, so its log-probs cannot be precomputed: drop one")
    if cfg.sync_ref_model and cfg.use_peft:
        problems.append("--sync_ref_model needs a separate reference model: use full fine-tuning (--use_peft False)")
    if cfg.reference_free and (cfg.precompute_ref_log_probs or cfg.sync_ref_model or cfg.ref_model):
        problems.append("--reference_free uses no reference model: drop --precompute_ref_log_probs/--sync_ref_model/--ref_model")
    if cfg.truncation_mode not in ("keep_end", "keep_start"):
        problems.append(f"--truncation_mode must be keep_end or keep_start, not {cfg.truncation_mode!r}")
    if cfg.lr_scheduler_type not in ("linear", "cosine", "constant"):
        problems.append(f"--lr_scheduler_type must be linear, cosine or constant, not {cfg.lr_scheduler_type!r}")
    if cfg.optim not in ("adamw_torch", "rmsprop", "paged_adamw_8bit"):
        problems.append(f"--optim must be adamw_torch, rmsprop or paged_adamw_8bit, not {cfg.optim!r}")
    if cfg.resume_from_checkpoint == "latest" and cfg.output_dir is None:
        problems.append("--resume_from_checkpoint latest looks in --output_dir: give it, or the checkpoint's path")
    if problems:
        raise OptionError("; ".join(problems))


def check_model_path(option: str, name: str):
    """A local model folder must exist and hold a model; a hub name ("org/name") is left to from_pretrained."""
    path = Path(name).expanduser()
    looks_local = path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
    if not looks_local:
        return
    if not path.is_dir():
        parent = path.parent
        holds = f"; {parent} holds: {sorted(p.name for p in parent.iterdir())[:10]}" if parent.is_dir() else ""
        raise RunError(f"{option} {name} does not exist{holds}; give a model folder (with config.json) or a hub name")
    if not (path / "config.json").is_file():
        hint = ("; it looks like a LoRA adapter: give its base model and merge it first (--merge_adapter)"
                if (path / "adapter_config.json").is_file() else "")
        raise RunError(f"{option} {name} holds no model (no config.json){hint}; give the folder save_pretrained wrote")


# ----------------------------------------------------------------------------------------------------------------
# The output folder

RUN_FILES = ("config.json", "metrics.jsonl", "curves.png", "sample_eval.json", "model", "merged")  # what a run writes


def run_entries(out: Path) -> list[Path]:
    """What an earlier run left in `out`: its files, checkpoint-<step>/ folders, temporary folders. The reference
    caches (ref_logps-*) stay: they are keyed on the weights and the tokens, so a new run can only reuse its own."""
    return sorted(p for p in out.iterdir() if p.name in RUN_FILES or p.name.startswith(".tmp-")
                  or (p.name.startswith("checkpoint-") and p.name.removeprefix("checkpoint-").isdigit()))


def check_output_dir(cfg):
    """A fresh run never writes into a used folder (it would mix two runs' metrics and checkpoints) unless
    --overwrite_output_dir; a resumed run continues its own folder."""
    out = Path(cfg.output_dir)
    if cfg.resume_from_checkpoint or not out.is_dir() or not any(out.iterdir()) or cfg.overwrite_output_dir:
        return
    raise RunError(f"--output_dir {out} is not empty (it holds {', '.join(sorted(p.name for p in out.iterdir())[:6])}); "
                   "choose a new --output_dir, continue it with --resume_from_checkpoint latest, or replace it with "
                   "--overwrite_output_dir")


def clear_output_dir(out: Path):
    """--overwrite_output_dir: remove what an earlier run wrote (only that: other files in the folder are kept)."""
    for p in run_entries(out):
        shutil.rmtree(p) if p.is_dir() else p.unlink()


# ----------------------------------------------------------------------------------------------------------------
# Resuming

# Options that may differ on resume; the change is stated. All but the learning rate change no number of the training
# (the learning rate is what one lowers to resume past a divergence: set_peak_learning_rate applies it).
MAY_CHANGE_ON_RESUME = {"learning_rate", "logging_steps", "eval_steps", "save_steps", "save_total_limit", "sample_eval", "show_examples",
                        "cpu_threads", "per_device_eval_batch_size", "output_dir", "resume_from_checkpoint",
                        "overwrite_output_dir", "debug", "export_trl"}


def check_resume(cfg, checkpoint: Path):
    """The run a checkpoint continues must be the same run: an option that changes its numbers (learning rate,
    schedule length, data, loss, ...) is refused, naming both values; the others are applied and stated."""
    try:
        saved = json.loads((checkpoint / "trainer_state.json").read_text()).get("config")
    except (OSError, ValueError):  # a broken checkpoint: load_checkpoint names the file against its manifest
        saved = None
    if saved is None:
        print(f"note: {checkpoint} records no options (an older checkpoint): resuming with the options given")
        return
    now = json.loads(json.dumps(vars(cfg)))  # the same types as the saved JSON
    changed = {k: (saved[k], now[k]) for k in saved if k in now and saved[k] != now[k]}
    refused = {k: v for k, v in changed.items() if k not in MAY_CHANGE_ON_RESUME}
    if refused:
        listed = ", ".join(f"--{k} {json.dumps(new)} (the checkpoint was trained with {json.dumps(old)})"
                           for k, (old, new) in refused.items())
        raise RunError(f"resuming {checkpoint} with other options than it was trained with: {listed}; these change the "
                       "training it continues (a schedule built for another length would make the learning rate jump): "
                       "resume with the checkpoint's options, or start a new run from its weights")
    for k, (old, new) in changed.items():
        if k not in ("resume_from_checkpoint", "output_dir", "overwrite_output_dir"):
            print(f"resume: --{k} changed from {json.dumps(old)} to {json.dumps(new)}: applied from step "
                  f"{checkpoint.name.removeprefix('checkpoint-')} on")


def set_peak_learning_rate(scheduler, lr: float):
    """After resuming, the schedule runs at --learning_rate: its shape and position are kept, its peak is the given
    one (the restored scheduler would otherwise keep the checkpoint's). A no-op when the rate is unchanged."""
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    for group, lr_lambda in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"], group["lr"] = lr, lr * lr_lambda(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]  # what get_last_lr() reports
