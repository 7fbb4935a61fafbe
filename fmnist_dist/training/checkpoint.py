"""Checkpoints written by rank 0: model, optimizer state and the training state, atomically.

A checkpoint is a directory RUN_DIR/checkpoints/examples-NNNNNNNNNN (training examples seen) holding TensorFlow's checkpoint files
and state.json (epoch, step, global step, the report so far, and the SHA-256 of every file). It is
written under a temporary name, fsynced, then renamed, so a crash or a full disk never leaves a
half checkpoint under a real name. The last `keep` are kept. Loading verifies the checksums and
falls back to the previous checkpoint when the newest is damaged, saying so.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile

from ..errors import CheckpointError

STATE_FILE = "state.json"
FORMAT_VERSION = 1



def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def list_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoints, oldest first (temporary directories are not checkpoints)."""
    root = checkpoint_root(run_dir)
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith("examples-"))
    return [os.path.join(root, n) for n in names]


def save(run_dir: str, model, optimizer, state: dict, keep: int) -> str:
    """Write a checkpoint named by state["samples_done"]; returns its directory."""
    import tensorflow as tf

    root = checkpoint_root(run_dir)
    final = os.path.join(root, f"examples-{state['samples_done']:010d}")
    tmp = None
    try:
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=root, prefix=".tmp-")
        tf.train.Checkpoint(model=model, optimizer=optimizer).write(os.path.join(tmp, "weights"))
        files = {name: _sha256(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
        payload = {"format_version": FORMAT_VERSION, "files": files, **state}
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(payload, f)
            f.flush()
            os.fsync(f.fileno())
        for name in files:
            _fsync_path(os.path.join(tmp, name))
        if os.path.exists(final):          # same step saved again (e.g. preempted at an epoch end)
            shutil.rmtree(final)
        os.rename(tmp, final)
        tmp = None
        _fsync_path(root)
    except (OSError, tf.errors.OpError) as e:
        reason = getattr(e, "strerror", None) or getattr(e, "message", None) or str(e)
        previous = list_checkpoints(run_dir)
        kept = f"; the previous checkpoint {previous[-1]} is intact" if previous else ""
        raise CheckpointError(f"{final}: could not write the checkpoint: {reason}{kept}") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest(run_dir: str, model, optimizer) -> tuple[dict, str]:
    """Restore the newest intact checkpoint into model and optimizer; returns (state, its dir).

    A damaged newest checkpoint is reported on stderr and the previous one is tried."""
    import tensorflow as tf

    candidates = list_checkpoints(run_dir)
    if not candidates:
        raise CheckpointError(f"{run_dir}: no checkpoint to resume from (looked in {checkpoint_root(run_dir)})")
    problems = []
    for path in reversed(candidates):
        try:
            state = verify(path)
            tf.train.Checkpoint(model=model, optimizer=optimizer).read(
                os.path.join(path, "weights")).assert_existing_objects_matched()
        except (CheckpointError, tf.errors.OpError, AssertionError, ValueError) as e:
            problems.append(f"{path}: {e}")
            print(f"fmnist-dist: warning: checkpoint {path} is unusable ({e}); trying the previous one",
                  file=sys.stderr, flush=True)
            continue
        return state, path
    raise CheckpointError(f"{run_dir}: no usable checkpoint: " + "; ".join(problems))


def verify(path: str) -> dict:
    """The checkpoint's state after checking every file against its recorded SHA-256."""
    try:
        with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{STATE_FILE} unreadable ({e})") from None
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"format version {state.get('format_version')!r}, expected {FORMAT_VERSION}")
    for name, expected in state["files"].items():
        file = os.path.join(path, name)
        if not os.path.exists(file):
            raise CheckpointError(f"{name} is missing")
        actual = _sha256(file)
        if actual != expected:
            raise CheckpointError(f"{name} is corrupt (SHA-256 {actual[:12]}…, expected {expected[:12]}…)")
    return state


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
