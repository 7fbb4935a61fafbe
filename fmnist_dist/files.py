"""Writing files that readers never see half-written, and the one timestamp format of the project."""
from __future__ import annotations

import os
import tempfile
from datetime import datetime, timezone


def atomic_write(path: str, text: str) -> None:
    """Write to a temp file in the same directory, fsync, rename: readers never see half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def now_iso() -> str:
    """UTC, to the second: how every report and record states a time."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
