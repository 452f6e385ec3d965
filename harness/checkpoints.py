"""Checkpoints, the final model folder and the metrics file: written so that nothing is lost and nothing misleads.

Plumbing for dpo.py; a reader of the algorithm can skip it. Every folder is written under a temporary name
(`.tmp-<name>`), its files flushed to disk (fsync), then renamed into place, so it exists whole or not at all.
A checkpoint also holds `manifest.json`, each file's size and sha256, checked before anything is loaded.
Weights that are NaN or inf are never saved. Faults the user can act on are a `CheckpointError`, one line:
what is wrong, where, what to do (and the last intact checkpoint when a write fails).

    output_dir/checkpoint-<step>/  trainable.safetensors  the weights that train (all, or the LoRA adapter)
                                   ref_model.safetensors  the reference, only with --sync_ref_model (TR-DPO moves it)
                                   optimizer.pt           optimizer and scheduler state, read with weights_only=True
                                   rng.safetensors        the CPU (and CUDA) random state
                                   trainer_state.json     the loop's own state (global_step, ...), from the
                                                          caller, and the checkpoint's place in its line
                                   manifest.json          {"files": {name: {"size", "sha256"}}}, written last
    output_dir/line.json           the line of checkpoints the run writing there continues

A checkpoint without manifest.json (written by dpo.py before manifests) is loaded when named explicitly, with a
printed note that its files cannot be verified; `latest` only picks checkpoints with a manifest.

Lines. Resuming from an earlier checkpoint (a rollback, say with a lower learning rate) abandons what the
first run saved after it: checkpoint-8 of the abandoned run is not the past of the new one, though its step is
higher. So each checkpoint records its id and its line, the checkpoints it continues, oldest first
(trainer_state.json: "checkpoint_id", "line": [{"step", "id"}, ...]; the last one is its parent), and
output_dir/line.json holds the line of the run that writes there now: set when the run starts (empty for a
fresh run; the checkpoint resumed from and its line for a resumed one), extended at each save. `latest` is the
newest checkpoint of that line, and --save_total_limit deletes only that line's older checkpoints, never the
one just saved, nor another line's. A folder counts as a line's checkpoint only when its recorded id is the
one the line names (a later run may have saved the same step again). An output_dir without line.json (an older
dpo.py) keeps the rule by step number.
"""
import copy
import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import uuid
from pathlib import Path

import safetensors.torch
import torch
from safetensors.torch import load_file, save_file

from harness import model_card
from harness.errors import CheckpointError

MANIFEST = "manifest.json"
LINE = "line.json"
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")  # exactly: a user's checkpoint-best/ or checkpoint-100-backup/ is not one


def trainable_state(model):
    return {k: v.detach().cpu().contiguous() for k, v in model.named_parameters() if v.requires_grad}


def checkpoint_folders(output_dir) -> list[Path]:
    """The folders named checkpoint-<integer> in output_dir, by step (with or without a manifest)."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and CHECKPOINT_NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.fullmatch(p.name)[1]))


def last_intact(output_dir):
    """The newest checkpoint of the current line whose manifest lists files that are all there with their
    sizes (None if none). Sizes only: hashing every checkpoint would take minutes for large ones;
    load_checkpoint checks the hashes."""
    line = read_line(output_dir)
    folders = checkpoint_folders(output_dir) if line is None else line_folders(output_dir, line)
    for folder in reversed(folders):
        if manifest_problem(folder, hashes=False) is None:
            return folder
    return None


# ---- writing ---------------------------------------------------------------------------------------------------


def save_checkpoint(output_dir, step, model, ref_model, optimizer, scheduler, trainer_state: dict,
                    save_total_limit=None, sync_ref_model=False) -> Path:
    """Write output_dir/checkpoint-<step> atomically as the next checkpoint of output_dir's line, and return
    its path; keep that line's newest save_total_limit."""
    out = Path(output_dir)
    line = [e for e in read_line(out) or [] if e["step"] < step]  # (the same step saved again replaces it)
    entry = {"step": step, "id": uuid.uuid4().hex[:16]}
    trainer_state = {**trainer_state, "checkpoint_id": entry["id"], "line": line}
    final, tmp = out / f"checkpoint-{step}", out / f".tmp-checkpoint-{step}"
    weights = trainable_state(model)
    bad = non_finite(weights) or (non_finite(dict(ref_model.named_parameters())) if sync_ref_model else None)
    if bad:  # a checkpoint of NaN weights would be "the last good one" and poison every resume from it
        last = last_intact(out)
        raise CheckpointError(f"the weights are non-finite (NaN or inf in {bad}) at step {step}, so nothing was saved "
                              f"in {final}; the last intact checkpoint is {last or 'none'}: "
                              + (f"resume from it with a lower --learning_rate (--resume_from_checkpoint {last})"
                                 if last else "start again with a lower --learning_rate"))
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file(weights, tmp / "trainable.safetensors")
        if sync_ref_model:  # TR-DPO changes the reference too. save_model stores tied weights (embedding = LM head) once
            safetensors.torch.save_model(ref_model, str(tmp / "ref_model.safetensors"))
        with open(tmp / "optimizer.pt", "wb") as f:  # a file object: a full disk then shows as OSError (the context)
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, f)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, tmp / "rng.safetensors")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state))
        files = {}
        for p in sorted(tmp.iterdir()):
            sync_file(p)
            files[p.name] = {"size": p.stat().st_size, "sha256": sha256(p)}
        (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
        sync_file(tmp / MANIFEST)
        replace_folder(tmp, final)
    except Exception as err:
        raise write_error(err, tmp, final, out) or err
    line.append(entry)
    if save_total_limit:  # this line's older checkpoints only: an abandoned line's are not this run's past
        for old in line[:-save_total_limit]:
            if belongs(out / f"checkpoint-{old['step']}", old) is True:
                shutil.rmtree(out / f"checkpoint-{old['step']}")
        line = line[-save_total_limit:]
    try:
        write_line(out, line)
    except Exception as err:
        raise write_error(err, out / f".tmp-{LINE}", out / LINE, out) or err
    return final


# ---- lines ---------------------------------------------------------------------------------------------


def start_line(output_dir, checkpoint):
    """At the start of a run, output_dir's line: empty for a fresh run; a resumed run continues its
    checkpoint's line (the checkpoints it continues, then itself)."""
    line = []
    if checkpoint is not None:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
        line = [*state.get("line", []), {"step": state["global_step"], "id": state.get("checkpoint_id")}]
    write_line(output_dir, line)


def read_line(output_dir):
    """output_dir/line.json's checkpoints, oldest first; None without one (a folder of an older dpo.py)."""
    path = Path(output_dir) / LINE
    try:
        line = json.loads(path.read_text())["line"]
        return [{"step": int(e["step"]), "id": e["id"]} for e in line]
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as err:  # written atomically: only a hand edit can break it
        raise CheckpointError(f"{path} is not a line of checkpoints ({type(err).__name__}: {err}), in "
                              f"{path.parent}; delete it, and name the checkpoint to resume from") from None


def write_line(output_dir, line):
    """output_dir/line.json, whole or not at all (written aside, flushed, renamed into place)."""
    out = Path(output_dir)
    tmp = out / f".tmp-{LINE}"
    tmp.write_text(json.dumps({"line": line}))
    sync_file(tmp)
    os.replace(tmp, out / LINE)
    sync_folder(out)


def belongs(folder: Path, entry: dict):
    """Whether folder is the checkpoint a line's entry names: there, with the entry's id (None for an older
    dpo.py's). None when its trainer_state.json is there but unreadable: damaged, maybe the line's own."""
    try:
        return json.loads((folder / "trainer_state.json").read_text()).get("checkpoint_id") == entry["id"]
    except FileNotFoundError:
        return False
    except (OSError, ValueError, AttributeError):
        return None


def line_folders(output_dir, line) -> list[Path]:
    """The checkpoints of a line still in output_dir, oldest first; a damaged one too, for load_checkpoint to
    name what is wrong with it rather than a resume silently going back to an older one."""
    folders = [Path(output_dir) / f"checkpoint-{e['step']}" for e in line]
    return [f for f, e in zip(folders, line) if belongs(f, e) is not False]


def write_file(path: Path, text: str, output_dir):
    """Write a whole file: a temporary file flushed to disk, then renamed over the old one (a crash or a full disk
    leaves the old file, never half of the new one). A failed write is a CheckpointError naming what was kept."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        tmp.write_text(text)
        sync_file(tmp)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise file_error(err, path, output_dir) from None


def append_line(path: Path, line: str, output_dir):
    """Append one line to metrics.jsonl, flushed to disk: a crash can cut only this last line short, which
    read_metrics drops. A failed write is a CheckpointError naming what was kept."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise file_error(err, path, output_dir) from None


def file_error(err: OSError, path: Path, output_dir) -> CheckpointError:
    """A file of the run that could not be written: what, why, what is kept and what to do."""
    last = last_intact(output_dir)
    what = "no space left on device" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "could not write"
    resume = (f"the last intact checkpoint is {last}: resume with --resume_from_checkpoint {last}" if last else
              "no checkpoint was saved yet: run again")
    return CheckpointError(f"{what} ({type(err).__name__}: {err.strerror or err}), in {path}; {resume} once the "
                           "disk can be written")


def check_final_weights(model, out: Path, step: int):
    """The final weights, checked on their device before they are saved: a NaN or inf model is never written (the
    gradient can be finite while the weight decay makes the weights inf)."""
    for name, p in model.named_parameters():
        if p.requires_grad and p.is_floating_point() and not bool(torch.isfinite(p).all()):
            last = last_intact(out)
            raise CheckpointError(
                f"the final weights are non-finite (NaN or inf in {name}) after step {step}, so no model was saved "
                f"in {out / 'model'}; the last intact checkpoint is {last or 'none'}: "
                + (f"resume from it with a lower --learning_rate or --weight_decay (--resume_from_checkpoint {last})"
                   if last else "start again with a lower --learning_rate or --weight_decay"))


def save_model(cfg, model, tokenizer, out):
    """Full fine-tuning: the model; LoRA: the adapter (AutoPeftModelForCausalLM loads it), and with
    --merge_adapter also the merged model. Always safetensors; each folder written whole or not at all, with its
    model card (README.md, model_card.py; it replaces the template peft writes)."""
    out = Path(out)
    records = read_metrics(out / "metrics.jsonl")  # the final evaluation, for the card
    check_final_weights(model, out, max((r["step"] for r in records), default=0))

    def write(folder, to_save):
        tmp = out / f".tmp-{folder}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            to_save.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / "README.md").write_text(model_card.model_card(cfg, records, folder))
            for p in tmp.rglob("*"):
                if p.is_file():
                    sync_file(p)
            replace_folder(tmp, out / folder)
        except Exception as err:
            raise write_error(err, tmp, out / folder, out) or err

    write("model", model)
    if cfg.use_peft and cfg.merge_adapter:
        if cfg.load_in_4bit:
            print("note: --merge_adapter with --load_in_4bit: reload the base in bf16 and merge with peft; skipped here")
        else:
            write("merged", copy.deepcopy(model).merge_and_unload())
    print(f"saved the model in {out / 'model'}")


def non_finite(tensors: dict):
    """The name of the first floating-point tensor with a NaN or inf, or None."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def sync_file(path: Path):
    """Flush the file to disk (fsync): renamed into place before its data is on disk, it could be empty after a
    power cut."""
    with open(path, "rb+") as f:  # rb+: fsync of a read-only handle fails on Windows
        os.fsync(f.fileno())


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def sync_folder(folder: Path):
    """fsync a folder, so that the renames in it survive a power cut (POSIX only)."""
    if os.name == "posix":
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def replace_folder(tmp: Path, final: Path):
    """Rename tmp to final. A folder cannot be renamed over a non-empty one, so an existing final is first moved
    aside and deleted after: at every moment one whole version exists."""
    sync_folder(tmp)
    old = final.with_name(f".tmp-old-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    sync_folder(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def write_error(err, tmp: Path, final: Path, output_dir):
    """Remove the partial tmp folder; return a CheckpointError for a failed write (a full disk, or any OSError),
    or None when err is not an I/O failure (a bug, to be seen as it is)."""
    shutil.rmtree(tmp, ignore_errors=True)
    cause = err
    while cause is not None and not isinstance(cause, OSError):  # torch.save wraps it in a RuntimeError
        cause = cause.__cause__ or cause.__context__
    text = str(err)
    if getattr(cause, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "os error 28" in text or "No space left" in text:
        what, todo, err = "no space left on device", "free space and", cause or err  # safetensors: a SafetensorError
    elif cause is not None or "I/O error" in text:
        what, todo, err = "could not write", "fix that and", cause or err
    else:
        return None
    last = last_intact(output_dir)
    resume = f"resume with --resume_from_checkpoint {last}" if last else "run again (there is no checkpoint to resume from)"
    detail = " ".join(f"{type(err).__name__}: {err}".split())[:200]
    return CheckpointError(f"{what} while saving {final} ({detail}); the last intact checkpoint is {last or 'none'}; "
                           f"{todo} {resume}")


# ---- reading ---------------------------------------------------------------------------------------------------


def find_checkpoint(output_dir, spec) -> Path:
    """spec 'latest': the newest checkpoint with a manifest of output_dir's line (without line.json: the
    highest checkpoint-<step> with a manifest); else spec is the folder."""
    if spec != "latest":
        path = Path(spec)
        if not path.is_dir():
            where = path.parent
            raise CheckpointError(f"checkpoint {path} does not exist" + ("" if not path.exists() else " as a folder")
                                  + f", in {where}; {choose_from(where)}")
        if not (path / MANIFEST).is_file() and not (path / "trainer_state.json").is_file():
            raise CheckpointError(f"{path} is not a checkpoint folder (it has no {MANIFEST}), in {path.parent}; "
                                  f"{choose_from(path.parent)}")
        return path
    line = read_line(output_dir)
    if line:  # (empty: a fresh run that saved nothing; its folder holds no other run's checkpoints)
        found = [p for p in line_folders(output_dir, line) if (p / MANIFEST).is_file()]
        if found:
            return found[-1]
        names = ", ".join(f"checkpoint-{e['step']}" for e in line)
        raise CheckpointError(f"--resume_from_checkpoint latest: no checkpoint of the line the last run "
                              f"continued ({names}) is left whole, in {output_dir}; "
                              + choose_from(output_dir))
    found = [p for p in checkpoint_folders(output_dir) if (p / MANIFEST).is_file()]
    if found:
        return found[-1]
    older = checkpoint_folders(output_dir)
    raise CheckpointError(f"--resume_from_checkpoint latest: no checkpoint-<step> folder with a {MANIFEST}, in {output_dir}; "
                          + (f"{older[-1].name} was written by an older dpo.py: name it to resume from it "
                             f"(--resume_from_checkpoint {older[-1]})" if older else
                             "start without --resume_from_checkpoint"))


def choose_from(output_dir, below=None) -> str:
    """What to do instead: the intact checkpoints in output_dir (below step `below`), newest first."""
    intact = [p for p in reversed(checkpoint_folders(output_dir)) if manifest_problem(p, hashes=False) is None
              and (below is None or int(p.name.split("-")[1]) < below)]
    if not intact:
        return f"there is no {'earlier ' if below is not None else ''}intact checkpoint there: start without --resume_from_checkpoint"
    return (f"resume from {'an earlier' if below is not None else 'an intact'} one: --resume_from_checkpoint {intact[0]}"
            f" (intact: {', '.join(p.name for p in intact)})")


def manifest_problem(folder: Path, hashes=True):
    """What does not match the folder's manifest (missing, wrong size, wrong sha256), or None when all match."""
    try:
        listed = {name: (int(f["size"]), f["sha256"]) for name, f in json.loads((folder / MANIFEST).read_text())["files"].items()}
    except FileNotFoundError:
        return f"{MANIFEST} is missing"
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is not a valid manifest"
    for name, (want_size, want_sha256) in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want_size:
            return f"{name} does not match its manifest ({size} bytes, expected {want_size})"
        if hashes and sha256(path) != want_sha256:
            return f"{name} does not match its manifest (its sha256 differs)"
    return None


def earlier(checkpoint: Path) -> str:
    """choose_from for the checkpoints before this one."""
    step = CHECKPOINT_NAME.fullmatch(checkpoint.name)
    return choose_from(checkpoint.parent, int(step[1]) if step else None)


def read(path: Path, reader):
    """reader(path), with what went wrong named: a file that is missing or unreadable, or one holding more than
    tensors and plain data (torch.load with weights_only=True refuses it before any of its code can run)."""
    try:
        return reader(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path.name} is missing, in {path.parent}; {earlier(path.parent)}") from None
    except pickle.UnpicklingError as err:
        text = " ".join(str(err).split())
        if "global" in text.lower():  # a class or function to import: the one case that could run code
            found = re.search(r"WeightsUnpickler error: (.*?)(?: was not an allowed global|\. |$)", text)
            raise CheckpointError(f"refusing {path}: it holds more than tensors and plain data "
                                  f"({found[1] if found else 'UnpicklingError'}), and unpickling it could run code, "
                                  f"in {path.parent}; delete it, or {earlier(path.parent)}") from None
        raise CheckpointError(f"cannot read {path} (UnpicklingError: {text[:120]}): corrupted or partly written, "
                              f"in {path.parent}; {earlier(path.parent)}") from None
    except Exception as err:  # safetensors' SafetensorError, torch's RuntimeError for a damaged zip, JSON errors
        detail = " ".join(str(err).split())[:120]
        raise CheckpointError(f"cannot read {path} ({type(err).__name__}: {detail}): corrupted or partly written, "
                              f"in {path.parent}; {earlier(path.parent)}") from None


def load_checkpoint(path, model, ref_model, optimizer, scheduler) -> dict:
    """Check the files against the manifest, then restore weights, reference (if saved), optimizer, scheduler and
    RNG; return the trainer_state saved with them. Only tensors and plain containers are unpickled
    (weights_only=True): a checkpoint from elsewhere cannot run code here."""
    path = Path(path)
    if (path / MANIFEST).exists():
        problem = manifest_problem(path)
        if problem:
            raise CheckpointError(f"{problem}: corrupted or partly written, in {path}; {earlier(path)}")
    else:
        print(f"note: {path} has no {MANIFEST} (written by an older dpo.py): its files are loaded unverified")
    state = read(path / "optimizer.pt", lambda p: torch.load(p, map_location="cpu", weights_only=True))
    weights = read(path / "trainable.safetensors", load_file)
    trainer_state = read(path / "trainer_state.json", lambda p: json.loads(p.read_text()))
    rng = read(path / "rng.safetensors", load_file)
    params = {k: v for k, v in model.named_parameters() if v.requires_grad}
    if weights.keys() != params.keys() or any(v.shape != params[k].shape for k, v in weights.items()):
        odd = sorted(weights.keys() ^ params.keys()) or [k for k, v in weights.items() if v.shape != params[k].shape]
        raise CheckpointError(f"{path / 'trainable.safetensors'} holds other weights than this run trains (e.g. {odd[0]}), "
                              f"in {path}; resume with the options it was saved with ({path.parent / 'config.json'})")
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v)
        if (path / "ref_model.safetensors").exists():
            if ref_model is None:
                raise CheckpointError(f"{path} holds a TR-DPO reference but this run has no reference model, in {path}; "
                                      "resume with the options it was saved with (--sync_ref_model --use_peft False)")
            try:
                safetensors.torch.load_model(ref_model, path / "ref_model.safetensors",
                                             device=str(next(ref_model.parameters()).device))
            except RuntimeError as err:  # missing or unexpected weights (the file itself matched its manifest)
                raise CheckpointError(f"{path / 'ref_model.safetensors'} holds another reference model than this run's "
                                      f"({' '.join(str(err).split())[:120]}), in {path}; resume with the options it was "
                                      f"saved with ({path.parent / 'config.json'})") from None
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"the optimizer state in {path / 'optimizer.pt'} does not fit this run's optimizer ({err}), "
                              f"in {path}; resume with the options it was saved with ({path.parent / 'config.json'})") from None
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return trainer_state


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl file ([] when there is none). A last line cut short by a crash in the middle
    of a write is dropped, with a note; a bad line before it is a CheckpointError."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [l for l in path.read_text(errors="replace").splitlines() if l.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):  # the only line a crash can leave half written: the file is appended to
                print(f"note: dropped the last line of {path}, cut short by an interrupted write: {line[:60]!r}")
                break
            raise CheckpointError(f"line {number} of {path} is not JSON ({err.msg}), in {path.parent}; "
                                  "delete that line (or the file) and resume") from None
    return records
