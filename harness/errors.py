"""The errors a user can act on, in one place. Each is one line on stderr, `dpo.py: error: <what was wrong>, <where>,
<what to do>` (no traceback; --debug shows it), raised before anything heavy where the input allows it. Messages end
without a period. Exit code 2 for options (as argparse's own errors), 1 for everything else."""


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
