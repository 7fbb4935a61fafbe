"""One writer per run directory: a lease file, RUN_DIR/writer.lock, naming its owner.

Rank 0 of a training takes the lease before it changes anything in the run directory and holds it
until it exits; a thread renews it every RENEW_S seconds. A second writer (another job with the same
RUN_DIR, a rerun while the old attempt still runs on a partitioned node) is refused with one line
naming the owner. A lease is stale, and taken over with a warning, when its owner is on this host
and its process is gone, or, from another host, when it was not renewed for EXPIRE_S seconds.

On shared file systems: the lease is created with O_CREAT|O_EXCL and taken over by rename, both
atomic on NFSv3 and later, Lustre and GPFS. Ages are measured with the file server's clock (the
mtime of a probe file written next to the lease), so the nodes' clocks need not agree, and
EXPIRE_S leaves room for NFS attribute caching (acregmax, 60 s by default) on top of RENEW_S.
Before each checkpoint and report the writer checks that the lease still names it (`Lease.check`):
a writer whose lease was taken over, or that could not renew it (it may have expired), stops
instead of writing.

A takeover is a compare-and-swap: only the file judged stale is removed, never a fresh lease a
quicker taker wrote meanwhile. Takers of one stale lease first create a claim file named after its
fingerprint (device, inode, mtime, size, content) with O_EXCL, so one of them goes on; it checks
the lease is still that file, renames it to a private name and compares again before deleting it
(a lease renewed in between goes back). A taker that dies holding a claim delays takeovers of that
lease by CLAIM_EXPIRE_S.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass

from .errors import RunDirError
from .files import now_iso, unlink_quietly

LEASE_FILE = "writer.lock"
RENEW_S = 15.0
EXPIRE_S = 90.0
CLAIM_EXPIRE_S = 30.0       # a takeover takes milliseconds: an older claim is a dead taker's
TAKEOVER_ATTEMPTS = 20
JOB_ID_VARS = ("SLURM_JOB_ID", "PBS_JOBID")


@dataclass
class Lease:
    path: str
    token: str
    owner: dict
    renew_error: str | None = None     # why the last renewal failed: `check` refuses from then on
    _stop: threading.Event | None = None
    _renewer: threading.Thread | None = None

    def check(self) -> None:
        """Raise RunDirError when another writer took the lease over, or when it could not be
        renewed (it may have expired and been taken over): this one must not write."""
        holder = read_owner(self.path)
        run_dir = os.path.dirname(self.path)
        if holder is None or holder.get("token") != self.token:
            who = describe(holder) if holder else "nobody (the lease file is gone)"
            raise RunDirError(f"{run_dir}: this run lost its writer lease ({self.path}) to "
                              f"{who}; stopping without writing")
        if self.renew_error is not None:
            raise RunDirError(f"{run_dir}: this run could not renew its writer lease {self.path} "
                              f"({self.renew_error}), so another job may take it over; stopping without writing")

    def renew_in_background(self) -> None:
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew_until_stopped, name="fmnist-lease", daemon=True)
        self._renewer.start()

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(RENEW_S) and self.renew():
            pass

    def renew(self) -> bool:
        """Refresh the lease's mtime if it still names this writer. False when it does not (taken
        over: `check` says so) or could not be renewed: said once on stderr, and `check` refuses."""
        try:
            with open(self.path, "rb") as f:
                holder = parse_owner(f.read(), self.path)
                if holder.get("unreadable"):
                    self._renewal_failed("its content cannot be read")
                    return False
                if holder.get("token") != self.token:
                    return False
                os.utime(f.fileno())       # the file just read; NULL times: the file server's clock
            return True
        except FileNotFoundError:
            return False
        except OSError as e:
            self._renewal_failed(e.strerror or str(e))
            return False

    def _renewal_failed(self, error: str) -> None:
        if self.renew_error is None:
            print(f"fmnist-dist: warning: cannot renew the writer lease {self.path}: {error}; this run stops "
                  f"before its next write", file=sys.stderr, flush=True)
        self.renew_error = error

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._renewer.join(timeout=2.0)   # a renewal in flight would change the fingerprint
        holder, fingerprint = read_holder(self.path)
        if holder is not None and holder.get("token") == self.token:
            try:
                _remove_if_same(self.path, fingerprint)
            except OSError:
                pass


def acquire(run_dir: str) -> Lease:
    """Take the run directory's lease (creating the directory), or raise RunDirError naming the
    owner. A stale lease is taken over with a warning on stderr."""
    path = os.path.join(run_dir, LEASE_FILE)
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": process_start(os.getpid()),
             "job_id": job_id(), "since": now_iso(), "token": uuid.uuid4().hex, "argv": sys.argv}
    took_over = None
    try:
        os.makedirs(run_dir, exist_ok=True)
        for attempt in range(TAKEOVER_ATTEMPTS):
            if _create(path, owner):
                if took_over:
                    print(f"fmnist-dist: warning: {run_dir}: taking over the writer lease from {took_over}",
                          file=sys.stderr, flush=True)
                return Lease(path, owner["token"], owner)
            holder, fingerprint = read_holder(path)
            if holder is None:
                continue                   # released meanwhile: try again
            stale = why_stale(holder, run_dir)
            if stale is None:
                raise RunDirError(busy_message(run_dir, holder))
            if take_over(path, fingerprint, owner):
                took_over = f"{describe(holder)} ({stale})"
            else:                          # another taker is at it: its new lease is there in a moment
                time.sleep(random.uniform(0.01, 0.03) * (attempt + 1))
    except OSError as e:
        raise RunDirError(f"{run_dir}: cannot write the run directory: {e.strerror or e}") from None
    raise RunDirError(f"{run_dir}: the writer lease {path} keeps changing hands; is another job starting here?")


def check_free(run_dir: str) -> None:
    """Raise RunDirError when a live writer holds the run directory (for commands that would write
    into it without owning it, such as the preflight)."""
    holder = read_owner(os.path.join(run_dir, LEASE_FILE))
    if holder is not None and holder.get("pid") != os.getpid() and why_stale(holder, run_dir) is None:
        raise RunDirError(busy_message(run_dir, holder))


def busy_message(run_dir: str, holder: dict) -> str:
    return (f"{run_dir}: another job is writing this run directory: {describe(holder)}; wait for it to end "
            f"or choose another --run-dir (a lease not renewed for {EXPIRE_S:g} s is taken over)")


def why_stale(holder: dict, run_dir: str) -> str | None:
    """Why the holder no longer writes, or None when it may still be writing."""
    if holder.get("host") == socket.gethostname():
        pid = holder.get("pid")
        if not isinstance(pid, int) or process_start(pid) is None:
            return f"process {pid} on this host has ended"
        if process_start(pid) != holder.get("pid_started"):
            return f"process {pid} on this host is another program now"
        return None
    age = lease_age(os.path.join(run_dir, LEASE_FILE), run_dir)
    if age is not None and age > EXPIRE_S:
        return f"not renewed for {age:.0f} s"
    return None


def lease_age(path: str, run_dir: str) -> float | None:
    """Seconds since the lease was last renewed, by the file server's clock."""
    probe = os.path.join(run_dir, f".lease-probe-{socket.gethostname()}-{os.getpid()}")
    try:
        with open(probe, "w"):
            pass
        now = os.stat(probe).st_mtime
        return now - os.stat(path).st_mtime
    except OSError:
        return None
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass


def describe(holder: dict) -> str:
    if holder.get("unreadable"):
        return f"an owner whose lease file {holder['unreadable']} cannot be read (being written, or damaged)"
    job = f", job {holder['job_id']}" if holder.get("job_id") else ""
    return f"host {holder.get('host')} pid {holder.get('pid')}{job} (since {holder.get('since')})"


def read_owner(path: str) -> dict | None:
    return read_holder(path)[0]


def read_holder(path: str) -> tuple[dict | None, tuple | None]:
    """The lease's owner and the fingerprint of the file read (device, inode, mtime, size, content
    hash; without the hash when it cannot be read): (None, None) when there is no lease."""
    try:
        with open(path, "rb") as f:
            data = f.read()
            st = os.fstat(f.fileno())
        content = hashlib.sha256(data).hexdigest()
    except (FileNotFoundError, NotADirectoryError):
        return None, None
    except OSError:
        data, content = b"", None
        try:
            st = os.stat(path)
        except OSError:
            return parse_owner(data, path), None
    return parse_owner(data, path), (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size, content)


def parse_owner(data: bytes, path: str) -> dict:
    try:
        holder = json.loads(data)
    except ValueError:
        holder = None
    return holder if isinstance(holder, dict) else {"host": "?", "pid": None, "token": None, "unreadable": path}


def job_id() -> str | None:
    return next((os.environ[v] for v in JOB_ID_VARS if os.environ.get(v)), None)


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (None if it is gone, or a zombie): a pid
    reused by another program has another start time."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _create(path: str, owner: dict) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(owner, f)
        f.flush()
        os.fsync(f.fileno())
    return True


def take_over(path: str, judged: tuple | None, owner: dict) -> bool:
    """Remove the stale lease `judged` (its fingerprint when it was judged stale) if it is still the
    file at `path`. False when another taker is at it, or the lease changed since it was judged."""
    if judged is None:
        return False                       # unreadable: nothing to compare what would be removed with
    claim = claim_path(path, judged)
    if not _create(claim, owner):
        _expire_claim(claim, os.path.dirname(path))
        return False
    try:
        # A taker that claimed after the winner removed the lease finds another file here (or none).
        return read_holder(path)[1] == judged and _remove_if_same(path, judged)
    finally:
        unlink_quietly(claim)


def claim_path(path: str, fingerprint: tuple) -> str:
    """The claim file of a takeover of the lease file `fingerprint` names (one per stale lease)."""
    return f"{path}.takeover-{hashlib.sha256(repr(fingerprint).encode()).hexdigest()[:16]}"


def _remove_if_same(path: str, fingerprint: tuple | None) -> bool:
    """Remove the file at `path` if it is the one `fingerprint` names: moved to a private name first
    and compared there, so that a file renewed or replaced meanwhile goes back instead."""
    aside = f"{path}.aside-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    if fingerprint is not None and read_holder(aside)[1] == fingerprint:
        os.unlink(aside)
        return True
    try:
        os.link(aside, path)               # back, unless a newer file took the name meanwhile
    except FileExistsError:
        pass                               # that newer one stands; the moved one's owner stops at `check`
    except OSError:
        os.rename(aside, path)             # a file system without hard links
        return False
    os.unlink(aside)
    return False


def _expire_claim(claim: str, run_dir: str) -> None:
    """Remove a takeover claim left by a taker that died (older than CLAIM_EXPIRE_S)."""
    fingerprint = read_holder(claim)[1]
    age = lease_age(claim, run_dir)
    if fingerprint is not None and age is not None and age > CLAIM_EXPIRE_S:
        _remove_if_same(claim, fingerprint)


HELD: Lease | None = None       # the lease this process holds (rank 0 of a training)


def hold(run_dir: str) -> Lease:
    """Acquire run_dir's lease for this process (once) and keep renewing it until release_held."""
    global HELD
    if HELD is None or HELD.path != os.path.join(run_dir, LEASE_FILE):
        HELD = acquire(run_dir)
        HELD.renew_in_background()
    return HELD


def check_held() -> None:
    """Before a write: raise RunDirError if this process lost its lease (a no-op without one)."""
    if HELD is not None:
        HELD.check()


def release_held() -> None:
    global HELD
    if HELD is not None:
        HELD.release()
        HELD = None
