"""Everything around a run that is not DPO: options checked before anything loads, the rules of the output folder
and of resuming, and the errors a user can act on. dpo.py calls it at the edges; a reader of the algorithm can
skip this file.

A user error is one line on stderr, `dpo.py: error: <what was wrong>, <where>, <what to do>`, with exit code 2 for
options (OptionError) and 1 for data, files and faults (RunError, data.DataError, checkpoints.CheckpointError).
"""
import hashlib
import json
import math
import shutil
from pathlib import Path

import torch

import data
from harness import checkpoints
from harness.errors import RunError


# ----------------------------------------------------------------------------------------------------------------
# Options


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

RUN_FILES = ("config.json", "metrics.jsonl", "curves.png", "sample_eval.json", "model", "merged",  # what a run writes
             "tensorboard", "wandb", "tracker.json", "line.json")  # (trackers.py, checkpoints.py)


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


def write_config(cfg, out: Path, resumed: bool):
    """config.json, the options the run really uses; --overwrite_output_dir first removes the earlier run's files."""
    out.mkdir(parents=True, exist_ok=True)
    if cfg.overwrite_output_dir and not resumed:
        clear_output_dir(out)
    (out / "config.json").write_text(json.dumps(vars(cfg), indent=1))


def preflight(cfg):
    """Before anything heavy: the model paths exist, the output folder may be used, and a resumed run's options
    are its checkpoint's. Returns the checkpoint to resume from, or None."""
    for option, name in (("--model", cfg.model), ("--ref_model", cfg.ref_model)):
        if name:
            check_model_path(option, name)
    check_output_dir(cfg)
    if not cfg.resume_from_checkpoint:
        return None
    checkpoint = checkpoints.find_checkpoint(cfg.output_dir, cfg.resume_from_checkpoint)
    check_resume(cfg, checkpoint)
    return checkpoint


def load_tokenizer(cfg):
    """The policy's tokenizer (and, with --ref_model, the check that the reference reads the same vocabulary)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:  # a hub name that cannot be reached, or no tokenizer files
        raise RunError(f"could not load the tokenizer of --model {cfg.model} ({str(err).splitlines()[0]}); "
                       "check the name or path (offline, a hub model must already be in the cache)") from err
    if cfg.ref_model:
        check_same_vocabulary(cfg, tokenizer)
    return tokenizer


# ----------------------------------------------------------------------------------------------------------------
# Resuming

# Options that may differ on resume; the change is stated. All but the learning rate change no number of the training
# (the learning rate is what one lowers to resume past a divergence: set_peak_learning_rate applies it).
MAY_CHANGE_ON_RESUME = {"learning_rate", "prefix_sharing", "report_to", "logging_steps", "eval_steps", "save_steps", "save_total_limit", "sample_eval", "show_examples",
                        "cpu_threads", "per_device_eval_batch_size", "output_dir", "resume_from_checkpoint",
                        "overwrite_output_dir", "debug", "export_trl", "config"}


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


# ----------------------------------------------------------------------------------------------------------------
# Checks of the models and the data before training, and what a run reports


def check_same_vocabulary(cfg, tokenizer):
    """DPO compares log pi(y|x) with log pi_ref(y|x) on the same token ids: both models must read them as the same
    tokens. Checked on the tokenizer files and configs, before any weights load."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        ref_vocab = AutoTokenizer.from_pretrained(cfg.ref_model, trust_remote_code=cfg.trust_remote_code).get_vocab()
    except (OSError, ValueError):  # a folder with weights only: fall back to the configs' vocabulary sizes below
        ref_vocab = None
    if ref_vocab is not None and ref_vocab != tokenizer.get_vocab():
        only = sorted(set(tokenizer.get_vocab().items()) ^ set(ref_vocab.items()))[:3]
        raise RunError(f"--ref_model {cfg.ref_model} has another tokenizer vocabulary than --model "
                       f"{cfg.model} ({len(ref_vocab):,} vs {len(tokenizer):,} tokens; differing e.g. {only}), so its "
                       "log-probs would score other tokens; use a reference from the same model family and tokenizer")
    sizes = [AutoConfig.from_pretrained(name, trust_remote_code=cfg.trust_remote_code).get_text_config().vocab_size
             for name in (cfg.model, cfg.ref_model)]
    if sizes[0] != sizes[1]:
        raise RunError(f"--ref_model {cfg.ref_model} has an output vocabulary of {sizes[1]:,} and "
                       f"--model {cfg.model} of {sizes[0]:,}; the two models must share the vocabulary (a policy "
                       "with added tokens needs a reference with the same resized embeddings)")


def check_positions(option: str, model, examples: list[dict], cfg):
    """A model with a learned table of positions (GPT-2's wpe, OPT's embed_positions) stops with an IndexError deep in
    its forward on a longer sequence: refuse it now, naming the length that fits. A rotary model has no table and
    runs, on positions its pre-training never saw: one printed line. (No model: nothing to check.)"""
    if not model:
        return
    c = model.config.get_text_config()
    limit = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)
    if not limit or not examples:
        return
    longest = max(len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in examples)
    longest = min(longest, cfg.max_length or longest)  # (truncation_scope row: collate cuts each sequence to it)
    width = data.padded_width(longest, cfg.pad_to_multiple_of)
    if width <= limit:
        return
    table = any(isinstance(m, torch.nn.Embedding) and name.rsplit(".", 1)[-1] in ("wpe", "embed_positions", "position_embeddings")
                for name, m in model.named_modules())
    padded = f" ({longest} padded to a multiple of --pad_to_multiple_of {cfg.pad_to_multiple_of})" if width > longest else ""
    if table:
        fix = f"--max_length {limit} or lower" if longest > limit else f"a --pad_to_multiple_of that divides {limit}"
        raise RunError(f"{option} {getattr(cfg, option.lstrip('-'))} has learned position embeddings for {limit} positions, "
                       f"but the longest sequence (prompt + completion) has {width} tokens{padded}; set {fix}")
    print(f"note: the longest sequence has {width} tokens{padded}, more than {option}'s max_position_embeddings "
          f"({limit}): positions past {limit} were not seen in its pre-training")


def use_reference_columns(cfg, train_set, eval_set):
    """Reference log-probs given in the data (ref_chosen_logps / ref_rejected_logps) replace the reference only with
    --precompute_ref_log_probs, and only if every pair has finite values; otherwise they are ignored, saying so."""
    examples = train_set + eval_set
    has = [("ref_chosen_logps" in ex) + ("ref_rejected_logps" in ex) for ex in examples]
    if not any(has):
        return
    if not cfg.precompute_ref_log_probs or cfg.reference_free:
        for ex in examples:
            ex.pop("ref_chosen_logps", None), ex.pop("ref_rejected_logps", None)
        print("note: the data's ref_chosen_logps/ref_rejected_logps columns are ignored: the reference is computed "
              "as configured (pass --precompute_ref_log_probs to use them instead)")
        return
    bad = next((i for i, (n, ex) in enumerate(zip(has, examples)) if n < 2 or not (
        math.isfinite(ex["ref_chosen_logps"]) and math.isfinite(ex["ref_rejected_logps"]))), None)
    if bad is not None:
        split, i = ("train", bad) if bad < len(train_set) else ("eval", bad - len(train_set))
        raise RunError(f"--precompute_ref_log_probs with reference columns in the data: pair {i} "
                       f"of the prepared {split} set has a missing or non-finite ref_chosen_logps/ref_rejected_logps; "
                       "give finite values for every pair or drop both columns to compute them here")
    print(f"reference log-probs: taken from the data's columns for all {len(examples)} pairs (no reference forward)")


def weights_fingerprint(model) -> str:
    """sha256 of the reference's weights (LoRA: of the frozen base, adapters excluded): new weights at the same path
    get a new fingerprint."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" not in name:
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(tensor.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy())
    return digest.hexdigest()


def count_parameters(model) -> int:
    """Parameters of the model as trained, counting a 4-bit weight by its logical shape (bitsandbytes packs two
    4-bit values per byte, so numel() of a packed weight is half the real count)."""
    return sum(p.quant_state.shape.numel() if getattr(p, "quant_state", None) is not None else p.numel()
               for p in model.parameters())


def plot_curves(metrics_file, png):
    from matplotlib.figure import Figure  # not pyplot: no global backend switch (notebooks keep their inline plots)

    records = checkpoints.read_metrics(metrics_file)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    fig = Figure(figsize=(18, 3.6))
    for ax, keys in zip(fig.subplots(1, 4), (["loss"], ["rewards/accuracies"], ["rewards/margins"], ["rewards/chosen", "rewards/rejected"])):
        for k in keys:
            ax.plot([r["step"] for r in train], [r[k] for r in train], label=k)
            if evals:
                ax.plot([r["step"] for r in evals], [r["eval_" + k] for r in evals], "o--", label="eval_" + k)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
