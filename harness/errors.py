"""The errors a user can act on, in one place. Each is one line on stderr, `dpo.py: error: <what was wrong>, <where>,
<what to do>` (no traceback; --debug shows it), raised before anything heavy where the input allows it. Messages end
without a period. Exit code 2 for options (as argparse's own errors), 1 for everything else, 128 + the signal's
number for a run stopped by a signal before its loop."""
import contextlib
import signal

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # Ctrl-C, a job scheduler's stop, a closed terminal


class OptionError(ValueError):
    """An option out of range or contradicting another (exit code 2)."""


class RunError(RuntimeError):
    """A fault the user can act on: a missing file, a used output folder, a non-finite step (exit code 1)."""


class DataError(ValueError):
    """A problem in the user's data: what is wrong, where (file and line, or split, row and field), what to do."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A dataset path that does not exist (a DataError for the CLI, a FileNotFoundError for everyone else)."""


class CheckpointError(RuntimeError):
    """A checkpoint, model folder or metrics file that cannot be written or read; the message says what to do."""


USER_ERRORS = (OptionError, RunError, DataError, CheckpointError)


class Interrupted(KeyboardInterrupt):
    """A signal outside the training loop (loading, precompute, the sample evaluation): the run stops where it is.
    `kept` says what the run has kept so far (harness/run.py updates it)."""
    kept = "nothing was trained yet; run the command again"

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum

    @staticmethod
    def message(err: KeyboardInterrupt) -> str:
        return f"interrupted ({signal.Signals(getattr(err, 'signum', signal.SIGINT)).name}); {Interrupted.kept}"


def _raise(signum, _frame):
    raise Interrupted(signum)


@contextlib.contextmanager
def interrupts():
    """For the command line: SIGTERM and SIGHUP stop the run as Ctrl-C does (a KeyboardInterrupt), so that a signal
    outside the loop leaves one line rather than a silent death. The loop takes over (run.catch_signals)."""
    previous = {sig: signal.signal(sig, _raise) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
