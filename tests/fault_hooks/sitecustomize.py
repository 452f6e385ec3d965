"""Test-only: pause `python dpo.py` at one phase of a run, so that tests/test_faults.py can signal it there.

Loaded by Python at start-up when this folder is on PYTHONPATH (tests/test_faults.py puts it there; nothing else
does). DPO_PAUSE_AT names the phase; at it, the run writes the file DPO_PAUSE_FILE and waits until a signal has
been noted (or 60 s), then goes on, so that the signal arrives exactly in that phase:

    before        writing config.json, before the loop (the signal stops the run at once)
    train         the second step, after its optimizer step
    eval          an evaluation during training, before its record is written
    checkpoint    a checkpoint save, its files written and not yet renamed into place
    interrupt     the save after a first signal (sent by this hook at step 1): the test sends the second
    final_eval    the final evaluation, before its record is written
    final_save    the final model save, its files written and not yet renamed into place
"""
import os
import time

PHASE, READY = os.environ.get("DPO_PAUSE_AT"), os.environ.get("DPO_PAUSE_FILE")

if PHASE and READY:
    import signal

    from harness import checkpoints, checks, run

    def pause(wait_for=1):
        """Say where we are, then wait for the test's signal (run._state counts the noted ones)."""
        open(READY, "w").write(PHASE)
        deadline = time.time() + 60
        while run._state["count"] < wait_for and time.time() < deadline:
            time.sleep(0.01)  # (before the loop, the signal raises here instead)

    def wrap(owner, name, when, wait_for=lambda: 1):
        original = getattr(owner, name)

        def hooked(*args, **kwargs):
            if when(*args, **kwargs):
                pause(wait_for())
            return original(*args, **kwargs)
        setattr(owner, name, hooked)

    is_eval = lambda self, record: "eval_loss" in record  # noqa: E731
    if PHASE == "before":
        wrap(checks, "write_config", lambda *a, **k: True)
    elif PHASE == "train":
        wrap(run.Run, "end_step", lambda self, *a: self.step == 1)
    elif PHASE == "eval":
        wrap(run.Run, "log", lambda self, record: is_eval(self, record) and self.step < self.total_steps)
    elif PHASE == "final_eval":
        wrap(run.Run, "log", lambda self, record: is_eval(self, record) and self.step >= self.total_steps)
    elif PHASE == "checkpoint":
        wrap(checkpoints, "replace_folder", lambda tmp, final: final.name.startswith("checkpoint-"))
    elif PHASE == "final_save":
        wrap(checkpoints, "replace_folder", lambda tmp, final: final.name == "model")
    elif PHASE == "interrupt":
        sig = signal.Signals[os.environ["DPO_FIRST_SIGNAL"]]
        wrap(run.Run, "end_step", lambda self, *a: self.step == 0 and os.kill(os.getpid(), sig) and False)
        wrap(checkpoints, "replace_folder", lambda tmp, final: run._state["count"] == 1, wait_for=lambda: 2)
