"""The plumbing of a training run, kept out of dpo.py's loop: the output folder, the metrics window and its log
lines, trackers, Ctrl-C/SIGTERM, checkpoints and the interrupt save, the reference-log-prob cache, and the end of a
run (the model, the curves, the sample evaluation). dpo.main calls it at the edges of the recipe; a reader of the
algorithm can skip this file and lose nothing of DPO.

    with Run(cfg, model, ref_model, optimizer, scheduler, checkpoint, steps_per_epoch) as run:
        while run.step < total_steps and not run.stopping:
            ...                                    # the step itself (dpo.py)
            run.add(metrics, tokens)               # each micro-batch's metrics into the open logging window
            run.end_step(loss, grad_norm, lr)      # the log line, when due
            run.checkpoint_if_due()
"""
import dataclasses
import functools
import hashlib
import json
import signal
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from harness import checkpoints, checks, trackers
from harness.errors import RunError


def start(cfg) -> torch.device:
    """Seed, device and threads, and the options printed as the run will use them."""
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    print(json.dumps(dataclasses.asdict(cfg), indent=1))
    return device


class Run:
    """The state around the loop: the step, the open logging window (metrics since the last log line, kept in
    checkpoints so that a resumed run logs what an uninterrupted one logs), the tracker, and the stop signal."""

    def __init__(self, cfg, model, ref_model, optimizer, scheduler, checkpoint, steps_per_epoch, total_steps):
        self.cfg, self.model, self.ref_model = cfg, model, ref_model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.out, self.steps_per_epoch, self.total_steps = Path(cfg.output_dir), steps_per_epoch, total_steps
        self.step, self.window, self.window_tokens, self.window_seconds = 0, {}, 0, 0.0
        self.signal, self.last_checkpoint, self.step_start = None, None, None
        if checkpoint:  # a checkpoint holds the open window too
            state = checkpoints.load_checkpoint(checkpoint, model, ref_model, optimizer, scheduler)
            self.step, self.window_tokens = state["global_step"], state.get("window_tokens", 0)
            self.window_seconds = state.get("window_seconds", 0.0)
            device = next(model.parameters()).device
            self.window = {k: [torch.tensor(x, device=device) for x in v] for k, v in state.get("window", {}).items()}
            checks.set_peak_learning_rate(scheduler, cfg.learning_rate)  # a --learning_rate changed on resume
            print(f"resumed from {checkpoint} at step {self.step}")
        checkpoints.start_line(self.out, checkpoint)  # what `latest` follows and --save_total_limit prunes
        self.metrics_file = self.out / "metrics.jsonl"
        kept = [r for r in checkpoints.read_metrics(self.metrics_file) if r["step"] <= self.step]
        self.metrics_file.write_text("".join(json.dumps(r) + "\n" for r in kept))  # what came after the checkpoint goes

    @property
    def stopping(self) -> bool:
        return self.signal is not None

    def __enter__(self):
        self.tracker = trackers.start(self.cfg, self.step)  # --report_to: each record also goes there
        # Ctrl-C (SIGINT) or a job scheduler's SIGTERM: finish the step, save a checkpoint, exit
        self.previous = {sig: signal.signal(sig, lambda sig, _: setattr(self, "signal", sig))
                         for sig in (signal.SIGINT, signal.SIGTERM)}
        self.bar = tqdm(total=self.total_steps, initial=self.step, desc="dpo", dynamic_ncols=True)
        return self

    def __exit__(self, kind, err, tb):
        self.bar.close()
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        trackers.finish(self.tracker)
        if isinstance(err, FloatingPointError):
            last = self.last_checkpoint or checkpoints.last_intact(self.out) or "none (no checkpoint was saved yet)"
            raise RunError(f"{err}; training stopped, and the last good checkpoint is {last}; resume from it with "
                           "a lower --learning_rate, or check the data") from None
        if isinstance(err, torch.cuda.OutOfMemoryError):
            raise RunError("out of GPU memory; reduce it with --per_device_train_batch_size 1 and "
                           "--gradient_accumulation_steps N, --gradient_checkpointing, --max_length, --load_in_4bit, "
                           "--precompute_ref_log_probs (no reference forward), or --optim paged_adamw_8bit") from None
        if err is None and self.signal:
            path = self.save_checkpoint()
            raise SystemExit(f"interrupted ({signal.Signals(self.signal).name}): saved {path}; "
                             f"continue with --resume_from_checkpoint {path}")
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
                          tokens_per_second=self.window_tokens / self.window_seconds)
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
        """One line of metrics.jsonl, the tracker, and the console."""
        with self.metrics_file.open("a") as f:
            f.write(json.dumps({"step": self.step, **record}) + "\n")
        trackers.log(self.tracker, record, self.step)
        tqdm.write(" ".join(f"{k}={v:.4g}" for k, v in {"step": self.step, **record}.items()))

    # ---- checkpoints ----
    def trainer_state(self) -> dict:  # what a checkpoint needs besides the weights
        return {"global_step": self.step, "window": {k: [float(x) for x in v] for k, v in self.window.items()},
                "window_tokens": self.window_tokens, "window_seconds": self.window_seconds,
                "config": dataclasses.asdict(self.cfg)}

    def save_checkpoint(self) -> Path:
        return checkpoints.save_checkpoint(self.cfg.output_dir, self.step, self.model, self.ref_model, self.optimizer,
                                           self.scheduler, self.trainer_state(), self.cfg.save_total_limit,
                                           self.cfg.sync_ref_model)


def cached_reference_logps(cfg, ref_model, examples, compute):
    """--precompute_ref_log_probs: the reference's log-probs of every pair, computed once (by `compute`, which stores
    them in each example) and kept in output_dir. The cache is keyed on what the numbers depend on: the reference's
    weights themselves (not their path, which iterative DPO overwrites with new weights), the dtype, the tokens and
    their truncation."""
    tokens = [[e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]] for e in examples]
    limits = [cfg.max_length, cfg.max_prompt_length, cfg.max_completion_length, cfg.truncation_mode,
              cfg.truncation_scope]
    key = hashlib.sha256(json.dumps([checks.weights_fingerprint(ref_model), cfg.ld_alpha, cfg.bf16, limits,
                                     tokens]).encode()).hexdigest()[:16]
    cache = Path(cfg.output_dir) / f"ref_logps-{key}.safetensors"
    if cache.exists():
        cached = load_file(cache)
        for ex, c, r in zip(examples, cached["chosen"].tolist(), cached["rejected"].tolist()):
            ex["ref_chosen_logps"], ex["ref_rejected_logps"] = c, r
        return
    compute()
    save_file({"chosen": torch.tensor([e["ref_chosen_logps"] for e in examples]),
               "rejected": torch.tensor([e["ref_rejected_logps"] for e in examples])}, cache)


def finish(cfg, model, tokenizer, eval_set, ref_model, load_reference, completion_logps):
    """The end of a run: the model (or adapter) with its card, the curves, and with --sample_eval the samples."""
    out = Path(cfg.output_dir)
    checkpoints.save_model(cfg, model, tokenizer, out)
    checks.plot_curves(out / "metrics.jsonl", out / "curves.png")
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
    (out / "sample_eval.json").write_text(json.dumps(result, indent=1))
