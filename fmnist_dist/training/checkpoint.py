"""Checkpoints written by rank 0: model, optimizer state and the training state, atomically.

A checkpoint is a directory RUN_DIR/checkpoints/examples-NNNNNNNNNN (training examples seen) holding
TensorFlow's checkpoint files and state.json (epoch, step, global step, the report so far, the
SHA-256 of every file, the code version that wrote it, and the SHA-256 of state.json's own content).

Never clobbers: a checkpoint is written under a temporary name, its files and directory fsynced,
then renamed into place and the parent directory fsynced; only then does anything older go. So a
crash or a full disk never leaves a half checkpoint under a listed name, and at every instant the
last good checkpoint is there. Saving a step that is already there (preempted at an epoch end)
swaps the two directories atomically (or, on a file system that cannot, adds examples-N.K, sorted
after examples-N) before the old copy goes. After a save the new checkpoint is the highest: any
numbered above it are stale (the run went back to an earlier one) and go, and of those below, the
newest keep - 1 stay. Temporary leftovers of a killed writer go at the next save or load.

Loading verifies the checksums and falls back to the previous checkpoint when the newest is damaged,
saying so, and sets the damaged one aside (damaged-examples-N) so that it is never chosen again. A
checkpoint of another format version is refused, naming both versions.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile

from ..errors import CheckpointError, CheckpointFormatError, cause
from ..files import TMP_PREFIX, fsync_path, remove_leftovers

STATE_FILE = "state.json"
FORMAT_VERSION = 2          # 2: state.json holds its own SHA-256 (state_sha256) and the code version
NAME = re.compile(r"^examples-(\d+)(?:\.(\d+))?$")     # examples-N, or examples-N.K: the K-th copy of step N
DAMAGED_PREFIX = "damaged-"



def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def list_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoints, lowest-numbered first (temporary and damaged ones are not listed)."""
    return _listed(checkpoint_root(run_dir))


def _listed(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    return [os.path.join(root, n) for n in sorted((n for n in os.listdir(root) if NAME.match(n)), key=number)]


def number(path: str) -> tuple[int, int]:
    """(examples seen, copy) of a checkpoint: its place in the order."""
    match = NAME.match(os.path.basename(path))
    return int(match.group(1)), int(match.group(2) or 0)


def save(run_dir: str, model, optimizer, state: dict, keep: int) -> str:
    """Write a checkpoint named by state["samples_done"]; returns its directory. Only once it is
    durable do the old copy of its step, stale higher-numbered checkpoints and those past `keep` go."""
    import tensorflow as tf

    root = checkpoint_root(run_dir)
    final = os.path.join(root, f"examples-{state['samples_done']:010d}")
    tmp = replaced = None
    try:
        _make_root(run_dir)
        tmp = tempfile.mkdtemp(dir=root, prefix=TMP_PREFIX)
        _write(tmp, model, optimizer, state)
        final, replaced = _place(tmp, final)
        tmp = None                                  # placed: from here on it is the checkpoint (or the old copy)
        fsync_path(root)
    except (OSError, tf.errors.OpError) as e:
        previous = [p for p in list_checkpoints(run_dir) if p != final]
        kept = f"; the previous checkpoint {previous[-1]} is intact" if previous else ""
        raise CheckpointError(f"{final}: could not write the checkpoint: {cause(e)}{kept}") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    _remove(([replaced] if replaced else []) + superseded(run_dir, final, keep))
    return final


def superseded(run_dir: str, newest: str, keep: int) -> list[str]:
    """What goes once `newest` is durable: any other copy of its step, every checkpoint numbered above
    it (stale: the run went back to an earlier one), and all but the keep - 1 newest below it."""
    steps = number(newest)[0]
    others = [p for p in list_checkpoints(run_dir) if p != newest]
    below = [p for p in others if number(p)[0] < steps]
    return [p for p in others if number(p)[0] >= steps] + below[:max(0, len(below) - (keep - 1))]


def _make_root(run_dir: str) -> None:
    root = checkpoint_root(run_dir)
    if not os.path.isdir(root):
        os.makedirs(root)
        fsync_path(run_dir)
    clear_leftovers(run_dir)


def clear_leftovers(run_dir: str) -> None:
    """Remove what a killed writer left half-written: temporary checkpoint directories and report
    files (rank 0 is the run directory's only writer, and it is between writes)."""
    remove_leftovers(checkpoint_root(run_dir))
    remove_leftovers(run_dir)


def _write(tmp: str, model, optimizer, state: dict) -> None:
    """The checkpoint's files in tmp, each and the directory fsynced."""
    import tensorflow as tf

    tf.train.Checkpoint(model=model, optimizer=optimizer).write(os.path.join(tmp, "weights"))
    files = {name: _sha256(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
    # Through JSON and back: the digest is of exactly what a reader will load.
    payload = json.loads(json.dumps({"format_version": FORMAT_VERSION, "code_version": code_version(),
                                     "files": files, **state}))
    payload["state_sha256"] = state_digest(payload)
    with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
        json.dump(payload, f)
        f.flush()
        os.fsync(f.fileno())
    for name in files:
        fsync_path(os.path.join(tmp, name))
    fsync_path(tmp)


def _place(tmp: str, final: str) -> tuple[str, str | None]:
    """Put the written checkpoint under a listed name; returns (that name, the directory now holding
    an old copy of the same step, to remove once the new one is durable, or None). A complete copy
    is listed at every instant: an old copy is swapped out atomically, or stays until removed."""
    if not os.path.exists(final):
        os.rename(tmp, final)
        return final, None
    if _exchange(tmp, final):
        return final, tmp
    copies = [number(p)[1] for p in _listed(os.path.dirname(final)) if number(p)[0] == number(final)[0]]
    copy = f"{final}.{max(copies) + 1}"
    os.rename(tmp, copy)                            # examples-N.K sorts after examples-N; that goes as superseded
    return copy, None


def _exchange(a: str, b: str) -> bool:
    """Swap two directories atomically (Linux renameat2 RENAME_EXCHANGE); False where the C library or
    the file system cannot (NFS, for one)."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    at_cwd, rename_exchange = -100, 2
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def _remove(paths: list[str]) -> None:
    """Remove checkpoints: first out of the listed names at once (renamed, the directory fsynced), then
    their files, so a crash halfway never leaves a half checkpoint under a listed name."""
    if not paths:
        return
    root, doomed = os.path.dirname(paths[0]), []
    try:
        for path in paths:
            aside = os.path.join(root, f"{TMP_PREFIX}old-{os.path.basename(path)}")
            os.rename(path, aside)
            doomed.append(aside)
        fsync_path(root)
    except OSError as e:
        print(f"fmnist-dist: warning: could not remove old checkpoints in {root}: {cause(e)}", file=sys.stderr,
              flush=True)
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)


def load_latest(run_dir: str, model, optimizer) -> tuple[dict, str]:
    """Restore the newest intact checkpoint into model and optimizer; returns (state, its dir).

    A damaged newest checkpoint is reported on stderr and the previous one is tried; once one loads,
    the damaged ones are set aside, never to be chosen again. A checkpoint of another format version
    is refused (CheckpointFormatError). Says so when the checkpoint was written by other code."""
    import tensorflow as tf

    candidates = list_checkpoints(run_dir)
    if not candidates:
        raise CheckpointError(f"{run_dir}: no checkpoint to resume from (looked in {checkpoint_root(run_dir)})")
    clear_leftovers(run_dir)
    problems, damaged = [], []
    for path in reversed(candidates):
        try:
            state = verify(path)
            tf.train.Checkpoint(model=model, optimizer=optimizer).read(
                os.path.join(path, "weights")).assert_existing_objects_matched()
        except CheckpointFormatError:
            raise
        except (CheckpointError, tf.errors.OpError, AssertionError, ValueError) as e:
            problems.append(f"{path}: {e}")
            print(f"fmnist-dist: warning: checkpoint {path} is unusable ({e}); trying the previous one",
                  file=sys.stderr, flush=True)
            damaged.append(path)
            continue
        for unusable in damaged:
            _set_aside(unusable)
        if state.get("code_version") != code_version():
            print(f"fmnist-dist: warning: checkpoint {path} was written by fmnist-dist {state.get('code_version')}; "
                  f"this is fmnist-dist {code_version()}", file=sys.stderr, flush=True)
        return state, path
    raise CheckpointError(f"{run_dir}: no usable checkpoint: " + "; ".join(problems))


def _set_aside(path: str) -> None:
    """Rename a damaged checkpoint out of the listed names (kept for a post-mortem, never loaded)."""
    root = os.path.dirname(path)
    aside, n = os.path.join(root, DAMAGED_PREFIX + os.path.basename(path)), 1
    while os.path.exists(aside):
        n += 1
        aside = os.path.join(root, f"{DAMAGED_PREFIX}{n}-{os.path.basename(path)}")
    try:
        os.rename(path, aside)
        fsync_path(root)
    except OSError as e:     # it stays listed; the next save removes it, being numbered above
        print(f"fmnist-dist: warning: could not set the unusable checkpoint {path} aside: {cause(e)}",
              file=sys.stderr, flush=True)
        return
    print(f"fmnist-dist: warning: the unusable checkpoint {path} is set aside as {aside}; it will not be "
          f"tried again", file=sys.stderr, flush=True)


def verify(path: str) -> dict:
    """The checkpoint's state after checking state.json's own SHA-256 and every file's.
    CheckpointFormatError (not damage) for a checkpoint of another format version."""
    try:
        with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{STATE_FILE} unreadable ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{STATE_FILE} holds no checkpoint state")
    recorded = state.get("state_sha256")
    if recorded is not None and recorded != state_digest(state):
        raise CheckpointError(f"{STATE_FILE} is corrupt (SHA-256 of its content {state_digest(state)[:12]}…, "
                              f"recorded {str(recorded)[:12]}…)")
    if state.get("format_version") != FORMAT_VERSION:
        written = f"fmnist-dist {state['code_version']}" if state.get("code_version") else "an earlier fmnist-dist"
        raise CheckpointFormatError(
            f"{path}: checkpoint format version {state.get('format_version')!r} (written by {written}); this "
            f"fmnist-dist {code_version()} reads format version {FORMAT_VERSION}: resume with the version that "
            f"wrote it, or start a new --run-dir")
    if recorded is None:
        raise CheckpointError(f"{STATE_FILE} has no state_sha256")
    for name, expected in state["files"].items():
        file = os.path.join(path, name)
        if not os.path.exists(file):
            raise CheckpointError(f"{name} is missing")
        actual = _sha256(file)
        if actual != expected:
            raise CheckpointError(f"{name} is corrupt (SHA-256 {actual[:12]}…, expected {expected[:12]}…)")
    return state


def state_digest(state: dict) -> str:
    """SHA-256 of the canonical JSON of a checkpoint's state without its own digest."""
    body = {k: v for k, v in state.items() if k != "state_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def written_by(path: str) -> str | None:
    """The code version a checkpoint records (None when it records none or cannot be read)."""
    try:
        with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
            return json.load(f).get("code_version")
    except (OSError, ValueError, AttributeError):
        return None


@functools.lru_cache(maxsize=None)
def code_version() -> str:
    """The running code: fmnist-dist's package version, plus the git commit when it runs from a git
    checkout ("0.1.0+g0123456789ab"). Read from .git itself: no git program needed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("fmnist-dist")
    except PackageNotFoundError:
        package = "unknown"
    commit = git_commit(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    return f"{package}+g{commit[:12]}" if commit else package


def git_commit(tree: str) -> str | None:
    """The commit HEAD names in tree/.git (a directory, or a worktree's file pointing to one); None
    when tree is no git checkout or its .git cannot be read."""
    try:
        git = os.path.join(tree, ".git")
        if os.path.isfile(git):
            pointer = _read(git)
            if not pointer.startswith("gitdir:"):
                return None
            git = os.path.join(tree, pointer.split(":", 1)[1].strip())
        head = _read(os.path.join(git, "HEAD"))
        if not head.startswith("ref:"):
            return head if re.fullmatch(r"[0-9a-f]{40,64}", head) else None
        ref = head.split(":", 1)[1].strip()
        common = os.path.join(git, _read(os.path.join(git, "commondir"))) if os.path.isfile(
            os.path.join(git, "commondir")) else git
        for base in (git, common):
            if os.path.isfile(os.path.join(base, ref)):
                return _read(os.path.join(base, ref))
        with open(os.path.join(common, "packed-refs"), encoding="utf-8") as f:
            return next((line.split()[0] for line in f if line.rstrip().endswith(f" {ref}")), None)
    except (OSError, UnicodeDecodeError):
        return None


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
