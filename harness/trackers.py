"""`--report_to tensorboard|wandb|trackio`: the records of metrics.jsonl, also sent to a tracker.

Plumbing for dpo.py; a reader of the algorithm can skip it. Each record goes out as it is written to metrics.jsonl,
at its step, under the names transformers' Trainer gives TRL's metrics (`rewrite_logs`), so that dashboards of
these runs and of TRL runs line up: `loss` -> `train/loss`, `rewards/margins` -> `train/rewards/margins`,
`eval_loss` -> `eval/loss`, `eval_rewards/margins` -> `eval/rewards/margins`.

    tensorboard  SummaryWriter events in output_dir/tensorboard/ (`tensorboard --logdir <output_dir>`)
    wandb        wandb.init/log/finish; project $WANDB_PROJECT (default huggingface, as transformers), files in
                 output_dir/wandb/ unless $WANDB_DIR; $WANDB_MODE=offline works without network or login
    trackio      trackio.init/log/finish; project $TRACKIO_PROJECT (default huggingface), stored where trackio keeps it

A resumed run continues the same tracker run: TensorBoard hides what the interrupted run logged after its
checkpoint (as metrics.jsonl drops it); W&B and Trackio continue the run whose id output_dir/tracker.json keeps.
"""
import dataclasses
import importlib
import json
import os
import secrets
import sys
from pathlib import Path

from harness.errors import RunError

REPORT_TO = ("none", "tensorboard", "wandb", "trackio")  # each tracker's package has the option value's name


def tracker_names(record: dict) -> dict:
    """transformers' rewrite_logs: eval_<name> -> eval/<name>, any other <name> -> train/<name>."""
    return {f"eval/{k.removeprefix('eval_')}" if k.startswith("eval_") else f"train/{k}": v for k, v in record.items()}


def start(cfg, step: int):
    """Open the tracker of --report_to for a run starting (or resuming) at `step`; None for --report_to none."""
    if cfg.report_to == "none":
        return None
    out = Path(cfg.output_dir)
    if cfg.report_to == "tensorboard":
        SummaryWriter = load(cfg, "torch.utils.tensorboard").SummaryWriter

        # purge_step: TensorBoard hides the events at and after it in earlier files, i.e. what an interrupted run
        # logged past the checkpoint this run resumes from (metrics.jsonl drops those lines too)
        writer = SummaryWriter(str(out / "tensorboard"), purge_step=step + 1 if step else None)
        if not step:
            writer.add_text("args", json.dumps(dataclasses.asdict(cfg), indent=1))  # as transformers' callback
        return "tensorboard", writer
    ids = out / "tracker.json"  # the tracker's run id, so that a resumed run continues the same run
    saved = json.loads(ids.read_text()) if step and ids.exists() else {}
    run_id = saved.get("id") if saved.get("report_to") == cfg.report_to else None
    run_id = run_id or secrets.token_hex(4)
    ids.write_text(json.dumps({"report_to": cfg.report_to, "id": run_id}))
    module = load(cfg, cfg.report_to)
    config = dataclasses.asdict(cfg)
    try:
        if cfg.report_to == "wandb":  # the Run object, not wandb.log: no global state between runs in one process
            handle = module.init(project=os.getenv("WANDB_PROJECT", "huggingface"), name=out.name, id=run_id,
                                 resume="allow", config=config, dir=None if os.getenv("WANDB_DIR") else str(out))
            # the x-axis is the training step, as in transformers: a resumed run's steps then fall in place
            handle.define_metric("train/global_step")
            handle.define_metric("*", step_metric="train/global_step", step_sync=True)
        else:  # trackio's module functions act on the run init started
            module.init(project=os.getenv("TRACKIO_PROJECT", "huggingface"), name=f"{out.name}-{run_id}",
                        resume="allow", config=config)
            handle = module
    except Exception as err:  # no login, no network: one line saying what to do, not the tracker's traceback
        detail = " ".join(str(err).split())[:200]
        raise RunError(f"--report_to {cfg.report_to} could not start ({type(err).__name__}: {detail}); "
                            + ("log in with `wandb login`, or set WANDB_MODE=offline" if cfg.report_to == "wandb"
                               else "check trackio's settings") + ", or run with --report_to none") from err
    return cfg.report_to, handle


def load(cfg, module: str):
    """The tracker's package: installed (checked with the options) but broken is one line, not a traceback."""
    try:
        return importlib.import_module(module)
    except Exception as err:  # an ImportError of a dependency, a version clash raising at import time
        detail = " ".join(str(err).split())[:200]
        raise RunError(f"--report_to {cfg.report_to}: importing {module} failed ({type(err).__name__}: {detail}); "
                       f"reinstall it (pip install -U {cfg.report_to}), or run with --report_to none") from None


def log(tracker, record: dict, step: int):
    """Send one metrics.jsonl record (without its step) to the tracker, at `step`."""
    if tracker is None:
        return
    kind, handle = tracker
    values = tracker_names(record)
    if kind == "tensorboard":
        for name, value in values.items():
            handle.add_scalar(name, value, step)
        handle.flush()  # on disk now: a run killed later keeps its curves
    elif kind == "wandb":
        handle.log({**values, "train/global_step": step})
    else:  # trackio's x-axis is its step: ours, not one per call (a training and an eval record share a step)
        handle.log({**values, "train/global_step": step}, step=step)


def finish(tracker):
    """Close the tracker, on every way out of the run; W&B marks a run that ends in an exception as failed."""
    if tracker is None:
        return
    kind, handle = tracker
    if kind == "tensorboard":
        handle.close()
    elif kind == "wandb":
        handle.finish(exit_code=1 if sys.exc_info()[0] is not None else 0)
    else:
        handle.finish()
