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
a writer whose lease was taken over stops instead of writing.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import uuid
from dataclasses import dataclass

from .errors import RunDirError
from .files import now_iso

LEASE_FILE = "writer.lock"
RENEW_S = 15.0
EXPIRE_S = 90.0
JOB_ID_VARS = ("SLURM_JOB_ID", "PBS_JOBID")


@dataclass
class Lease:
    path: str
    token: str
    owner: dict
    _stop: threading.Event | None = None

    def check(self) -> None:
        """Raise RunDirError when another writer took the lease over (this one must not write)."""
        holder = read_owner(self.path)
        if holder is None or holder.get("token") != self.token:
            who = describe(holder) if holder else "nobody (the lease file is gone)"
            raise RunDirError(f"{os.path.dirname(self.path)}: this run lost its writer lease ({self.path}) to "
                              f"{who}; stopping without writing")

    def renew_in_background(self) -> None:
        self._stop = threading.Event()
        threading.Thread(target=self._renew, name="fmnist-lease", daemon=True).start()

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            holder = read_owner(self.path)
            if holder is None or holder.get("token") != self.token:
                return                     # taken over: `check` says so before the next write
            try:
                os.utime(self.path)        # NULL times: the file server's clock sets the mtime
            except OSError:
                pass

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
        holder = read_owner(self.path)
        if holder is not None and holder.get("token") == self.token:
            try:
                os.unlink(self.path)
            except OSError:
                pass


def acquire(run_dir: str) -> Lease:
    """Take the run directory's lease (creating the directory), or raise RunDirError naming the
    owner. A stale lease is taken over with a warning on stderr."""
    path = os.path.join(run_dir, LEASE_FILE)
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": process_start(os.getpid()),
             "job_id": job_id(), "since": now_iso(), "token": uuid.uuid4().hex, "argv": sys.argv}
    try:
        os.makedirs(run_dir, exist_ok=True)
        for _ in range(3):
            if _create(path, owner):
                return Lease(path, owner["token"], owner)
            holder = read_owner(path)
            if holder is None:
                continue                   # released meanwhile: try again
            stale = why_stale(holder, run_dir)
            if stale is None:
                raise RunDirError(busy_message(run_dir, holder))
            if _set_aside(path):
                print(f"fmnist-dist: warning: {run_dir}: taking over the writer lease from {describe(holder)} "
                      f"({stale})", file=sys.stderr, flush=True)
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
    try:
        with open(path, encoding="utf-8") as f:
            holder = json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError):
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


def _set_aside(path: str) -> bool:
    """Move a stale lease out of the way; False when another taker moved it first."""
    aside = f"{path}.stale-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, aside)             # the claim: of two takers, one rename finds nothing
    except FileNotFoundError:
        return False
    os.unlink(aside)
    return True


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
