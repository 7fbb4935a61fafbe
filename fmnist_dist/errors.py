"""Every error that is the user's to fix (input, environment), worded for the user. The command line
(cli.main) turns any of them into one line `fmnist-dist: error: ...` and exit status 2; anything
else is a bug and keeps its traceback."""
from __future__ import annotations

import re


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


class NodeError(FmnistError):
    """Found by one rank on its own node before the ranks are connected (before Horovod starts), so
    perhaps by this rank alone: every rank that finds it prints it (cli.main), naming its host."""


class NodeDataError(NodeError, DataError):
    """A DataError found by the cheap check of the data before Horovod starts (cli.cmd_train)."""


class CheckpointFormatError(CheckpointError):
    """A checkpoint of another format version: refused (not damaged, so never skipped silently)."""


class ReportWriteError(ReportError):
    """A report file, epoch log, plot or TensorBoard log that cannot be written: names the file."""


class DivergenceError(FmnistError):
    """The training loss became NaN or infinite: names the epoch and step (`where`); the checkpoints
    written before it are kept and none is written after it."""

    def __init__(self, message: str, where: dict | None = None):
        super().__init__(message)
        self.where = where or {}


def cause(error: BaseException) -> str:
    """What went wrong with a file, without the decorations TensorFlow adds around an OS error
    ("{{function_node ...}} <file>; No space left on device [Op:SaveV2]" -> "No space left on device")."""
    text = getattr(error, "strerror", None) or getattr(error, "message", None) or str(error)
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)
    text = re.sub(r"\s*\[Op:\w+\].*$", "", text, flags=re.S)
    return text.rsplit("; ", 1)[-1].strip() or type(error).__name__
