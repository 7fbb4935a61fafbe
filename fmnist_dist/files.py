"""Writing files that readers never see half-written, and the one timestamp format of the project."""
from __future__ import annotations

import os
import shutil
import tempfile
from datetime import datetime, timezone


TMP_PREFIX = ".tmp-"     # the names of files being written; what a kill -9 leaves, remove_leftovers clears


def atomic_write(path: str, text: str) -> None:
    """Write to a temp file in the same directory, fsync, rename, fsync the directory: readers never
    see half a file, and after a crash the file is the old one or the new one."""
    tmp = stage(path, text)
    try:
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise
    fsync_path(os.path.dirname(os.path.abspath(path)))


def stage(path: str, text: str) -> str:
    """Write text, fsynced, to a temporary file next to path; returns its name (os.replace it onto path)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=TMP_PREFIX,
                               suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        unlink_quietly(tmp)
        raise
    return tmp


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def fsync_path(path: str) -> None:
    """Make a file's data, or a directory's entries (a rename, a new file), durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_leftovers(directory: str) -> list[str]:
    """Remove the temporary files and directories (TMP_PREFIX) a killed writer left in directory;
    returns their names. Only for the directory's one writer, between its writes."""
    try:
        names = sorted(n for n in os.listdir(directory) if n.startswith(TMP_PREFIX))
    except (FileNotFoundError, NotADirectoryError):
        return []
    for name in names:
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            unlink_quietly(path)
    return names


def now_iso() -> str:
    """UTC, to the second: how every report and record states a time."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
