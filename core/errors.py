"""What a failure means to the person who ran the command, and the exit codes that say it.

`UserError` marks failures the user fixes (config, data, weights, workdir, checkpoints): run.py
prints their message (cause and fix, one or two lines) and exits with `EXIT_USER_ERROR`; the
traceback is shown only with `--verbose`. Any other exception is a bug and keeps its traceback.

Exit codes of `python run.py` (documented in the README, "When things go wrong"):
"""

from __future__ import annotations

EXIT_OK = 0  # the job finished
EXIT_CRASH = 1  # an unexpected error (a bug): the traceback is printed
EXIT_USER_ERROR = 2  # a user-fixable error (config, data, weights, workdir, checkpoint)
EXIT_NON_FINITE = 3  # training stopped on a NaN/inf; the last checkpoint written is finite
# Preempted (SIGTERM, or orbax's preemption notice): a checkpoint was saved and rerunning the
# same command resumes. 75 is EX_TEMPFAIL of sysexits.h, "try again later".
EXIT_PREEMPTED = 75


class UserError(Exception):
    """A failure whose message names the cause and the fix; no traceback needed."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work (unknown name, wrong type, inconsistent settings)."""


class WorkdirError(UserError, OSError):
    """The workdir cannot be used (it is a file, or not writable)."""


class Diverged(Exception):
    """Training met a NaN/inf and stopped without saving it; run.py exits with EXIT_NON_FINITE."""
