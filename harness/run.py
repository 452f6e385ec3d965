"""The plumbing of a training run, kept out of dpo.py's loop: the output folder, the metrics window and its log
lines, trackers, Ctrl-C/SIGTERM/SIGHUP, checkpoints and the interrupt save, the reference-log-prob cache, and the
end of a run (the model, the curves, the sample evaluation). dpo.main calls it at the edges of the recipe; a reader
of the algorithm can skip this file and lose nothing of DPO.

    with Run(cfg, model, ref_model, optimizer, scheduler, checkpoint, steps_per_epoch) as run:
        while run.step < total_steps and not run.stopping:
            ...                                    # the step itself (dpo.py)
            run.add(metrics, tokens)               # each micro-batch's metrics into the open logging window
            run.end_step(loss, grad_norm, lr)      # the log line, when due
            run.checkpoint_if_due()

Signals: from the loop's start until the last save is done (the final model, in `finish`), SIGINT, SIGTERM and
SIGHUP are only noted; the loop stops at the end of its step and saves a checkpoint, and a second signal during a
save waits for it. Before the loop (loading, precompute) a signal stops the run at once (`interrupts`, for the
command line): nothing has been trained then.
"""
import dataclasses
import functools
import hashlib
import json
import math
import os
import signal
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from harness import checkpoints, checks, trackers
from harness.errors import SIGNALS, Interrupted, RunError

_state = {"signal": None, "count": 0, "previous": {}}  # the signal noted (None: none yet), how many, old handlers


def _note(signum, _frame):  # no printing here: a handler may run in the middle of a print
    _state["signal"], _state["count"] = signum, _state["count"] + 1


def catch_signals():
    """From now until `release_signals`, a signal is noted (Run.stopping), not acted on: saves run to their end."""
    if not _state["previous"]:
        _state["previous"] = {sig: signal.signal(sig, _note) for sig in SIGNALS}
    _state["signal"], _state["count"] = None, 0


def release_signals():
    for sig, handler in _state["previous"].items():
        signal.signal(sig, handler)
    _state["previous"] = {}


def start(cfg) -> torch.device:
    """Seed, device and threads, and the options printed as the run will use them."""
    Interrupted.kept = "nothing was trained yet; run the command again"
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    print(json.dumps(dataclasses.asdict(cfg), indent=1))
    return device


def finite_record(record: dict) -> dict:
    """The record as strict JSON can hold it: a NaN or inf becomes null (json.dumps would write a bare NaN)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


class Run:
    """The state around the loop: the step, the open logging window (metrics since the last log line, kept in
    checkpoints so that a resumed run logs what an uninterrupted one logs), the tracker, and the stop signal."""

    def __init__(self, cfg, model, ref_model, optimizer, scheduler, checkpoint, steps_per_epoch, total_steps,
                 data_fingerprint=None):
        self.cfg, self.model, self.ref_model = cfg, model, ref_model
        self.optimizer, self.scheduler, self.data_fingerprint = optimizer, scheduler, data_fingerprint
        self.out, self.steps_per_epoch, self.total_steps = Path(cfg.output_dir), steps_per_epoch, total_steps
        self.step, self.window, self.window_tokens, self.window_seconds = 0, {}, 0, 0.0
        self.last_checkpoint, self.step_start = None, None
        if checkpoint:  # a checkpoint holds the open window too
            state = checkpoints.load_checkpoint(checkpoint, model, ref_model, optimizer, scheduler)
            self.step, self.window_tokens = state["global_step"], state.get("window_tokens", 0)
            self.window_seconds = state.get("window_seconds", 0.0)
            device = next(model.parameters()).device
            self.window = {k: [torch.tensor(x, device=device) for x in v] for k, v in state.get("window", {}).items()}
            checks.set_peak_learning_rate(scheduler, cfg.learning_rate)  # a --learning_rate changed on resume
            self.last_checkpoint = Path(checkpoint)
            print(f"resumed from {checkpoint} at step {self.step}")
        checkpoints.start_line(self.out, checkpoint)  # what `latest` follows and --save_total_limit prunes
        self.metrics_file = self.out / "metrics.jsonl"
        kept = [r for r in checkpoints.read_metrics(self.metrics_file) if r["step"] <= self.step]
        # what came after the checkpoint goes (written whole: a crash here leaves the old file, not half of it)
        checkpoints.write_file(self.metrics_file, "".join(json.dumps(r) + "\n" for r in kept), self.out)
        # a resumed finished run has its final evaluation already: it is not run (and recorded) twice
        self.final_eval = next(({k: v for k, v in r.items() if k != "step"} for r in reversed(kept)
                                if "eval_loss" in r and r["step"] >= total_steps), None)

    @property
    def stopping(self) -> bool:
        return _state["signal"] is not None

    def __enter__(self):
        self.tracker = trackers.start(self.cfg, self.step)  # --report_to: each record also goes there
        catch_signals()  # until the final model is saved (finish): each save runs to its end
        self.bar = tqdm(total=self.total_steps, initial=self.step, desc="dpo", dynamic_ncols=True)
        return self

    def __exit__(self, kind, err, tb):
        self.bar.close()
        trackers.finish(self.tracker)
        if err is None and self.stopping:
            try:  # (a checkpoint saved at this very step is the one to resume from)
                saved = self.last_checkpoint if self.last_checkpoint == self.out / f"checkpoint-{self.step}" else None
                path = saved or self.save_checkpoint()
            finally:
                release_signals()
            raise SystemExit(f"interrupted ({signal.Signals(_state['signal']).name}): saved {path}; "
                             f"continue with --resume_from_checkpoint {path}")
        if err is None:
            return False  # the signals stay caught until the final model is saved
        release_signals()
        if isinstance(err, FloatingPointError):
            last = self.last_checkpoint or checkpoints.last_intact(self.out) or "none (no checkpoint was saved yet)"
            raise RunError(f"{err}; training stopped, and the last good checkpoint is {last}; resume from it with "
                           "a lower --learning_rate, or check the data") from None
        if isinstance(err, torch.cuda.OutOfMemoryError):
            raise RunError("out of GPU memory; reduce it with --per_device_train_batch_size 1 and "
                           "--gradient_accumulation_steps N, --gradient_checkpointing, --max_length, --load_in_4bit, "
                           "--precompute_ref_log_probs (no reference forward), or --optim paged_adamw_8bit") from None
        return False

    # ---- metrics ----
    def begin_step(self):
        self.step_start = time.time()  # tokens_per_second counts training time only, not evaluation or saving

    def add(self, metrics: dict, tokens: int):
        """One micro-batch's metrics (tensors: no device sync until the window is logged) and its token count."""
        for k, v in metrics.items():
            self.window.setdefault(k, []).append(v)
        self.window_tokens += tokens

    def end_step(self, loss, grad_norm, learning_rate):
        """After optimizer.step(): close the step and write its log line when one is due."""
        self.step += 1
        self.window_seconds += time.time() - self.step_start
        self.window.setdefault("loss", []).append(loss)
        self.window.setdefault("grad_norm", []).append(grad_norm.detach())  # measured before clipping
        if self.step % self.cfg.logging_steps == 0 or self.step == self.total_steps:
            record = {k: torch.stack(v).float().mean().item() for k, v in self.window.items()}  # one sync per window
            record.update(learning_rate=learning_rate, epoch=self.step / self.steps_per_epoch,
                          tokens_per_second=self.window_tokens / max(self.window_seconds, 1e-9))
            if torch.cuda.is_available():
                record["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
            self.log(record)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['rewards/accuracies']:.2f}",
                                 margin=f"{record['rewards/margins']:.3f}", tok_s=f"{record['tokens_per_second']:.0f}")
            self.window, self.window_tokens, self.window_seconds = {}, 0, 0.0
        self.bar.update(1)

    def eval_due(self) -> bool:
        return bool(self.cfg.eval_steps) and self.step % self.cfg.eval_steps == 0 and self.step < self.total_steps

    def checkpoint_if_due(self):
        """After the step's evaluation (a checkpoint implies it was logged): every --save_steps steps."""
        if self.cfg.save_steps and self.step % self.cfg.save_steps == 0:
            self.last_checkpoint = self.save_checkpoint()

    def log(self, record: dict):
        """One line of metrics.jsonl (strict JSON: a non-finite number is null), the tracker, and the console. A
        non-finite evaluation stops the run: the weights that gave it are not worth keeping."""
        record = finite_record(record)
        checkpoints.append_line(self.metrics_file, json.dumps({"step": self.step, **record}, allow_nan=False),
                                self.out)
        trackers.log(self.tracker, {k: v for k, v in record.items() if v is not None}, self.step)
        tqdm.write(" ".join(f"{k}={v:.4g}" if v is not None else f"{k}=nan"
                            for k, v in {"step": self.step, **record}.items()))
        if "eval_loss" in record and self.step >= self.total_steps:
            self.final_eval = record
        bad = [k for k, v in record.items() if k.startswith("eval_") and v is None]
        if bad:
            raise FloatingPointError(f"non-finite evaluation ({bad[0]} is NaN or inf) at step {self.step}")

    # ---- checkpoints ----
    def trainer_state(self) -> dict:  # what a checkpoint needs besides the weights
        return {"global_step": self.step, "window": {k: [float(x) for x in v] for k, v in self.window.items()},
                "window_tokens": self.window_tokens, "window_seconds": self.window_seconds,
                "config": dataclasses.asdict(self.cfg), "data": self.data_fingerprint}

    def save_checkpoint(self) -> Path:
        path = checkpoints.save_checkpoint(self.cfg.output_dir, self.step, self.model, self.ref_model,
                                           self.optimizer, self.scheduler, self.trainer_state(),
                                           self.cfg.save_total_limit, self.cfg.sync_ref_model)
        Interrupted.kept = f"the last checkpoint is {path}: continue with --resume_from_checkpoint {path}"
        return path


def cached_reference_logps(cfg, ref_model, examples, compute):
    """--precompute_ref_log_probs: the reference's log-probs of every pair, computed once (by `compute`, which stores
    them in each example) and kept in output_dir. The cache is keyed on what the numbers depend on: the reference's
    weights themselves (not their path, which iterative DPO overwrites with new weights), the dtype, the tokens and
    their truncation. It is written whole (a temporary file renamed) and carries the sha256 of its numbers: a cache
    cut short or changed is noticed and computed again."""
    tokens = [[e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]] for e in examples]
    limits = [cfg.max_length, cfg.max_prompt_length, cfg.max_completion_length, cfg.truncation_mode,
              cfg.truncation_scope]
    key = hashlib.sha256(json.dumps([checks.weights_fingerprint(ref_model), cfg.ld_alpha, cfg.bf16, limits,
                                     tokens]).encode()).hexdigest()[:16]
    cache = Path(cfg.output_dir) / f"ref_logps-{key}.safetensors"
    if cache.exists():
        problem = cache_problem(cache, len(examples))
        if problem is None:
            cached = load_file(cache)
            for ex, c, r in zip(examples, cached["chosen"].tolist(), cached["rejected"].tolist()):
                ex["ref_chosen_logps"], ex["ref_rejected_logps"] = c, r
            return
        print(f"note: the reference cache {cache} is damaged ({problem}): computing it again")
    compute()
    tensors = {"chosen": torch.tensor([e["ref_chosen_logps"] for e in examples]),
               "rejected": torch.tensor([e["ref_rejected_logps"] for e in examples])}
    tmp = cache.with_name(f".tmp-{cache.name}")
    try:
        save_file(tensors, tmp, metadata={"pairs": str(len(examples)), "sha256": numbers_sha256(tensors)})
        checkpoints.sync_file(tmp)
        os.replace(tmp, cache)
    except Exception as err:  # only a speed-up: the run goes on without it
        tmp.unlink(missing_ok=True)
        print(f"note: could not keep the reference cache {cache} ({type(err).__name__}: {err}): continuing without it")


def numbers_sha256(tensors: dict) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(tensors[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


def cache_problem(cache: Path, pairs: int):
    """What is wrong with a reference cache (cut short, another size, numbers changed), or None."""
    try:
        with safe_open(cache, "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(cache)
    except Exception as err:  # safetensors refuses a file whose size does not match its header
        return f"{type(err).__name__}: {' '.join(str(err).split())[:80]}"
    if "sha256" not in meta:
        return "no sha256 in its header (an older dpo.py wrote it)"
    if meta.get("pairs") != str(pairs) or any(t.shape != (pairs,) for t in tensors.values()):
        return f"{meta.get('pairs')} pairs, expected {pairs}"
    if numbers_sha256(tensors) != meta["sha256"]:
        return "its numbers do not match their sha256"
    return None


def finish(cfg, model, tokenizer, eval_set, ref_model, load_reference, completion_logps):
    """The end of a run: the model (or adapter) with its card, the curves, and with --sample_eval the samples. The
    signals stay caught until the model is saved; a signal during the save lets it finish, then skips the rest."""
    out = Path(cfg.output_dir)
    try:
        checkpoints.save_model(cfg, model, tokenizer, out)
    finally:
        release_signals()
        checks.release_output_dir(out)
    Interrupted.kept = f"the model is saved in {out / 'model'}"
    checks.plot_curves(out / "metrics.jsonl", out / "curves.png")
    if _state["signal"] is not None:
        print(f"note: {signal.Signals(_state['signal']).name} during the final save: the model is saved whole in "
              f"{out / 'model'}; the sample evaluation is skipped")
        return
    if not (cfg.sample_eval and eval_set):
        return
    from demo.sample_eval import sample_eval
    from harness.options import DEMO_DATASET

    prompts = [ex["prompt_ids"] for ex in eval_set[:cfg.sample_eval]]  # the token ids trained on, template and all
    reward_fn = None
    if Path(cfg.dataset).resolve() == DEMO_DATASET:  # the shipped task has a programmatic ground truth
        from demo.sentiment import sentiment_score as reward_fn
    if ref_model is None and (cfg.ref_model or not cfg.use_peft):  # freed after precompute: reload the run's one
        ref_model = load_reference()
    # under the run's autocast, as in training: a QLoRA model's fp32 norms feed a bf16 LM head
    autocast = functools.partial(torch.autocast, next(model.parameters()).device.type, dtype=torch.bfloat16,
                                 enabled=cfg.bf16)
    result = sample_eval(model, tokenizer, prompts, score=lambda m, batch: completion_logps(m, batch)[0],
                         reference=ref_model, reward_fn=reward_fn, seed=cfg.seed, autocast=autocast)
    checkpoints.write_file(out / "sample_eval.json", json.dumps(result, indent=1), out)

