"""Everything around a run that is not DPO: options checked before anything loads, the rules of the output folder
and of resuming, and the errors a user can act on. dpo.py calls it at the edges; a reader of the algorithm can
skip this file.

A user error is one line on stderr, `dpo.py: error: <what was wrong>, <where>, <what to do>`, with exit code 2 for
options (OptionError) and 1 for data, files and faults (RunError, data.DataError, checkpoints.CheckpointError).
"""
import fcntl
import hashlib
import json
import math
import os
import shutil
import socket
import sys
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
    if path.is_file():
        raise RunError(f"{option} {name} is a file, not a model folder, in {path.parent}; give the folder that holds "
                       "config.json and the weights, or a hub name")
    if not path.is_dir():
        parent = path.parent
        holds = f"; {parent} holds: {sorted(p.name for p in parent.iterdir())[:10]}" if parent.is_dir() else ""
        raise RunError(f"{option} {name} does not exist{holds}; give a model folder (with config.json) or a hub name")
    if not (path / "config.json").is_file():
        hint = ("; it looks like a LoRA adapter: give its base model and merge it first (--merge_adapter)"
                if (path / "adapter_config.json").is_file() else "")
        raise RunError(f"{option} {name} holds no model (no config.json){hint}; give the folder save_pretrained wrote")
    check_weight_files(option, path)


def check_weight_files(option: str, path: Path):
    """Each safetensors file of a local model must be whole: its header names its size, so a file cut short by a
    copy or a download is found here (reading only the headers) and not as a traceback after loading."""
    from safetensors import safe_open

    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(file, "pt"):
                pass
        except Exception as err:  # safetensors' SafetensorError: "incomplete metadata, file not fully covered"
            raise RunError(f"{option}: {file.name} is truncated or damaged ({' '.join(str(err).split())[:100]}), "
                           f"in {path}; copy or download the model again") from None


def hub_reachable(cfg):
    """A hub name without HF_HUB_OFFLINE: is the hub reachable at all? Without network, from_pretrained retries for
    most of a minute and then blames the name; one connection attempt of 5 seconds says it plainly. A model already
    in the local cache is then used offline."""
    names = [(o, n) for o, n in (("--model", cfg.model), ("--ref_model", cfg.ref_model), ("--dataset", cfg.dataset))
             if n and not Path(n).expanduser().exists() and n.count("/") == 1 and not n.startswith((".", "/", "~"))]
    if not names or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=5).close()
        return
    except OSError as err:
        reason = f"{type(err).__name__}: {err}"
    from huggingface_hub import try_to_load_from_cache

    missing = [(o, n) for o, n in names if o == "--dataset" or not isinstance(
        try_to_load_from_cache(n, "config.json"), str)]
    if missing:
        listed = ", ".join(f"{o} {n}" for o, n in missing)
        raise RunError(f"the hub cannot be reached ({endpoint.hostname}: {reason}) and {listed} is not in the local "
                       "cache; connect to the network, or give a local folder (or set HF_HUB_OFFLINE=1 for a cached "
                       "model)")
    os.environ["HF_HUB_OFFLINE"] = "1"
    print(f"note: the hub cannot be reached ({reason}): using the cached {', '.join(n for _, n in names)} offline")


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
    --overwrite_output_dir; a resumed run continues its own folder. A folder that a failed run left with only its
    config.json (it stopped before training) holds nothing to keep, and is used again."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise RunError(f"--output_dir {out} is a file, not a folder; choose another --output_dir")
    if cfg.resume_from_checkpoint or not out.is_dir() or cfg.overwrite_output_dir:
        return
    held = sorted(p.name for p in out.iterdir() if p.name != LOCK and not p.name.startswith(".tmp-config"))
    if not held or held == ["config.json"]:
        return
    last = checkpoints.last_intact(out)  # (advise a resume only where there is one to resume from)
    resume = f", continue it with --resume_from_checkpoint latest ({last.name})," if last else ""
    raise RunError(f"--output_dir {out} is not empty (it holds {', '.join(held[:6])}); choose a new --output_dir"
                   f"{resume} or replace it with --overwrite_output_dir"
                   + ("" if last else " (it holds no checkpoint to resume from)"))


def check_overwrite_keeps_inputs(cfg):
    """--overwrite_output_dir deletes what an earlier run wrote; never an input of this run that lies there (the
    model of round one of iterative DPO, in round one's output folder, is round two's --model)."""
    out = Path(cfg.output_dir)
    if not (cfg.overwrite_output_dir and out.is_dir()) or cfg.resume_from_checkpoint:
        return
    inputs = [("--model", cfg.model), ("--ref_model", cfg.ref_model), ("--dataset", cfg.dataset)]
    for entry in run_entries(out):
        e = entry.resolve()
        for option, name in inputs:
            if not name or not Path(name).expanduser().exists():
                continue
            p = Path(name).expanduser().resolve()
            if p == e or e in p.parents or p in e.parents:
                raise RunError(f"--overwrite_output_dir would delete {entry}, which {option} {name} needs, in {out}; "
                               f"copy {option} elsewhere first, or choose a new --output_dir")


# ---- one run per folder: a lock held for the whole run ----

LOCK = ".lock"
_locks = {}  # folder -> its open lock file; the kernel releases the lock when the process ends, however it ends


def claim_default_output_dir(cfg):
    """A default output folder (runs/dpo-<time>) is created here, atomically: runs started in the same second get
    runs/dpo-<time>-2, -3, ... instead of one folder between them."""
    from harness import options

    if cfg.output_dir not in options.DEFAULT_OUTPUT_DIRS or cfg.resume_from_checkpoint:
        return
    base, n = cfg.output_dir, 1
    Path(base).parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            os.mkdir(cfg.output_dir)
            return
        except FileExistsError:
            n += 1
            cfg.output_dir = f"{base}-{n}"
            options.DEFAULT_OUTPUT_DIRS.add(cfg.output_dir)


def lock_output_dir(out: Path):
    """Hold output_dir/.lock (fcntl.flock) until the run ends: a second run into the same folder is refused, naming
    the process that holds it. A lock left by a process that is gone is no lock: the kernel released it."""
    key = str(out.resolve())
    if key in _locks:  # this process holds it already (dpo.main called again in one Python session)
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        f = open(out / LOCK, "a+")
    except OSError as err:
        raise RunError(f"cannot write in --output_dir {out} ({type(err).__name__}: {err.strerror or err}); choose a "
                       "folder this user can write, or fix its permissions") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = " ".join(f.read().split())[:200] or "another process"
        f.close()
        raise RunError(f"--output_dir {out} is in use by another run ({holder}); wait for it to end, or choose "
                       "another --output_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}: {' '.join([sys.executable, *sys.argv])}\n")
    f.flush()
    _locks[key] = f


def release_output_dir(out: Path):
    f = _locks.pop(str(Path(out).resolve()), None)
    if f is not None:
        f.close()  # (closing the file releases the lock; the file stays, naming the last holder)


def clear_output_dir(out: Path):
    """--overwrite_output_dir: remove what an earlier run wrote (only that: other files in the folder are kept)."""
    for p in run_entries(out):
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def write_config(cfg, out: Path, resumed: bool):
    """config.json, the options the run really uses; --overwrite_output_dir first removes the earlier run's files."""
    out.mkdir(parents=True, exist_ok=True)
    if cfg.overwrite_output_dir and not resumed:
        clear_output_dir(out)
    checkpoints.write_file(out / "config.json", json.dumps(vars(cfg), indent=1), out)


def preflight(cfg):
    """Before anything heavy: the model paths exist, the output folder may be used, and a resumed run's options
    are its checkpoint's. Returns the checkpoint to resume from, or None."""
    for option, name in (("--model", cfg.model), ("--ref_model", cfg.ref_model)):
        if name:
            check_model_path(option, name)
    hub_reachable(cfg)
    claim_default_output_dir(cfg)
    check_output_dir(cfg)
    check_overwrite_keeps_inputs(cfg)
    lock_output_dir(Path(cfg.output_dir))  # held until the final model is saved (run.finish) or the process ends
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
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise RunError(f"the tokenizer of --model {cfg.model} has neither an EOS nor a pad token, so completions "
                       "cannot be ended or batches padded; set eos_token (and pad_token) in its tokenizer_config.json")
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


def data_fingerprint(train_set: list[dict], eval_set: list[dict]) -> dict:
    """What the run trains and evaluates on, as token ids after preparation: per split, the number of pairs, a
    short sha256 of each pair and one of them all. A dataset edited in place at the same path changes it."""
    def split(examples):
        rows = [hashlib.sha256(json.dumps([e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]]).encode())
                .hexdigest()[:8] for e in examples]
        return {"pairs": len(rows), "sha256": hashlib.sha256("".join(rows).encode()).hexdigest(), "rows": rows}
    return {"train": split(train_set), "eval": split(eval_set)}


def check_resume_data(checkpoint, train_set: list[dict], eval_set: list[dict]) -> dict:
    """A resumed run must train on the rows its checkpoint was trained on, not only on the same path: the data's
    fingerprint is compared with the one saved in the checkpoint, naming what changed. Returns the fingerprint."""
    now = data_fingerprint(train_set, eval_set)
    if checkpoint is None:
        return now
    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    except (OSError, ValueError):  # a broken checkpoint: load_checkpoint names the file against its manifest
        return now
    saved = state.get("data")
    if not saved:
        print(f"note: {checkpoint} records no fingerprint of its data (an older dpo.py): the data is not compared")
        return now
    for name in ("train", "eval"):
        old, new = saved[name], now[name]
        if old["sha256"] == new["sha256"]:
            continue
        first = next((i for i, (a, b) in enumerate(zip(old["rows"], new["rows"])) if a != b), None)
        what = (f"the prepared {name} set has {new['pairs']} pairs where the checkpoint's had {old['pairs']}"
                if first is None else f"pair {first} of the prepared {name} set differs")
        dataset = (state.get("config") or {}).get("dataset", "the dataset")
        raise RunError(f"resuming {checkpoint} on other data than it was trained on: {what} (--dataset {dataset} "
                       "was edited or replaced); resume with the data it was trained on, or start a new run from its "
                       "weights")
    return now


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
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    bad = next((i for i, (n, ex) in enumerate(zip(has, examples)) if n < 2 or not (
        number(ex["ref_chosen_logps"]) and number(ex["ref_rejected_logps"]))), None)
    if bad is not None:
        split, i = ("train", bad) if bad < len(train_set) else ("eval", bad - len(train_set))
        raise RunError(f"--precompute_ref_log_probs with reference columns in the data: pair {i} "
                       f"of the prepared {split} set has a missing, non-numeric or non-finite ref_chosen_logps/"
                       "ref_rejected_logps; give finite numbers for every pair or drop both columns to compute them here")
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
            value = lambda r, k: float("nan") if r.get(k) is None else r[k]  # noqa: E731  (null: non-finite)
            ax.plot([r["step"] for r in train], [value(r, k) for r in train], label=k)
            if evals:
                ax.plot([r["step"] for r in evals], [value(r, "eval_" + k) for r in evals], "o--", label="eval_" + k)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    png = Path(png)
    tmp = png.with_name(f".tmp-{png.name}")
    try:  # written whole, and only a picture of metrics.jsonl: a failure is a note, the model is saved already
        fig.savefig(tmp, dpi=90, format="png")
        os.replace(tmp, png)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        print(f"note: could not write {png} ({type(err).__name__}: {err.strerror or err}); the model and "
              f"metrics.jsonl are kept in {png.parent}")
