"""Every error that is the user's to fix (input, environment), worded for the user. The command line
(cli.main) turns any of them into one line `fmnist-dist: error: ...` and exit status 2; anything
else is a bug and keeps its traceback."""
from __future__ import annotations


class FmnistError(Exception):
    """Base of every error that is the user's to fix."""


class UsageError(FmnistError):
    """A command-line option out of its range (the config's own keys raise ConfigError)."""


class ConfigError(FmnistError):
    """A configuration problem: names the file or --set, the key, what was given and what was expected."""


class DataError(FmnistError):
    """The data: which file, expected vs actual, where it was searched."""


class SetupError(FmnistError):
    """The software or hardware environment cannot do what the config asks (ITEX requested but not
    installed, bf16 requested on a CPU without it)."""


class RunDirError(FmnistError):
    """The run directory cannot be used (holds a finished run, not writable, ...)."""


class CheckpointError(FmnistError):
    """A checkpoint could not be written, or none could be read."""


class ReportError(FmnistError):
    """A report that cannot be read: missing, corrupt or of an unknown schema."""


class ProjectionError(FmnistError):
    """The runs given do not allow a projection (says why)."""


class LaunchError(FmnistError):
    """The job cannot be launched as asked; worded for the job log."""
