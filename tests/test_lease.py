"""The run directory's writer lease with real processes and files: takers racing for one stale lease
(exactly one wins, and no loser moves the winner's fresh lease aside), a takeover claim left by a
dead taker expires, and a writer that cannot renew its lease says so once and stops before its next
write."""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import PYTHON, ROOT, run_env, unavailable
from fmnist_dist import lease
from fmnist_dist.errors import RunDirError

RACERS = 4
ROUNDS = 30


def dead_pid() -> int:
    """The pid of a process of this host that has ended."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def write_stale_lease(run_dir: Path, elsewhere: bool) -> None:
    """A lease whose owner is gone: a dead process of this host, or another host's lease not renewed
    for longer than EXPIRE_S."""
    run_dir.mkdir(parents=True)
    path = run_dir / lease.LEASE_FILE
    host, pid = ("node-elsewhere", 1234) if elsewhere else (socket.gethostname(), dead_pid())
    path.write_text(json.dumps({"host": host, "pid": pid, "pid_started": None, "job_id": "4242",
                                "since": "2026-01-01T00:00:00+00:00", "token": f"stale-{run_dir.name}"}))
    if elsewhere:
        past = time.time() - lease.EXPIRE_S - 60
        os.utime(path, (past, past))


def file_state(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_ctime_ns


def race(base: str, rounds: int, barrier, results) -> None:
    """One racer (a process of its own): every round, try to take round-N's stale lease when all
    racers are released together; the winner checks, once every racer is done, that its lease is
    still there and was never renamed or relinked (either would change its ctime)."""
    for n in range(rounds):
        barrier.wait(timeout=60)
        try:
            held = lease.acquire(os.path.join(base, f"round-{n}"))
            created = file_state(held.path)
        except RunDirError as e:
            held, outcome = None, {"refused": str(e)}
        barrier.wait(timeout=60)
        if held is not None:
            try:
                held.check()
                outcome = {"won": held.token, "kept": file_state(held.path) == created,
                           "ctime_is_mtime": created[1] == created[2]}
            except RunDirError as e:
                outcome = {"won": held.token, "lost": str(e)}
        results.put((n, outcome))


def check_round(run_dir: Path, outcomes: list[dict]) -> None:
    winners = [o for o in outcomes if "won" in o]
    assert len(winners) == 1, f"{run_dir.name}: {len(winners)} racers took the lease: {outcomes}"
    winner = winners[0]
    assert "lost" not in winner, f"{run_dir.name}: a loser moved the winner's fresh lease aside: {winner['lost']}"
    assert winner["kept"] and winner["ctime_is_mtime"], f"{run_dir.name}: the winner's lease was moved and put back"
    refusals = [o["refused"] for o in outcomes if "refused" in o]
    assert all("another job is writing this run directory" in r for r in refusals), refusals
    assert lease.read_owner(str(run_dir / lease.LEASE_FILE))["token"] == winner["won"]
    assert sorted(os.listdir(run_dir)) == [lease.LEASE_FILE], "a claim or a moved lease was left behind"


def test_racing_takers_of_a_stale_lease_one_wins_and_keeps_it(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(RACERS + 1), ctx.Queue()
    racers = [ctx.Process(target=race, args=(str(tmp_path), ROUNDS, barrier, results)) for _ in range(RACERS)]
    for p in racers:
        p.start()
    try:
        for n in range(ROUNDS):
            write_stale_lease(tmp_path / f"round-{n}", elsewhere=n % 2 == 1)
            barrier.wait(timeout=60)          # go
            barrier.wait(timeout=60)          # every racer has won or been refused
            outcomes = [results.get(timeout=60) for _ in range(RACERS)]
            assert {n} == {r for r, _ in outcomes}
            check_round(tmp_path / f"round-{n}", [o for _, o in outcomes])
    finally:
        barrier.abort()
        for p in racers:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(10)


def test_a_claim_left_by_a_dead_taker_expires(tmp_path, capfd):
    run_dir = tmp_path / "run"
    write_stale_lease(run_dir, elsewhere=False)
    path = str(run_dir / lease.LEASE_FILE)
    claim = lease.claim_path(path, lease.read_holder(path)[1])
    Path(claim).write_text("{}")
    past = time.time() - lease.CLAIM_EXPIRE_S - 60
    os.utime(claim, (past, past))
    held = lease.acquire(str(run_dir))
    assert lease.read_owner(path)["token"] == held.token
    assert not os.path.exists(claim)
    assert "taking over the writer lease from host" in capfd.readouterr().err


# Holds a lease with the real renewal thread, then loses the right to renew it: the lease file is
# root's, and the process becomes nobody (os.utime then fails with EACCES, as on a file system that
# went read-only or a lease whose owner changed).
HOLDER = """
import os, sys, threading
from fmnist_dist import lease
from fmnist_dist.errors import RunDirError
lease.RENEW_S = 0.05
lease.hold(sys.argv[1])
os.setgid(65534)
os.setuid(65534)
for thread in threading.enumerate():
    if thread.name == "fmnist-lease":
        thread.join(5)
try:
    lease.check_held()
    print("wrote")
except RunDirError as e:
    print("refused:", e)
"""


def test_a_writer_that_cannot_renew_its_lease_says_so_once_and_stops_before_writing():
    if os.geteuid() != 0:
        unavailable("needs root (to take away the right to renew a lease)")
    base = tempfile.mkdtemp(prefix="fmnist-lease-")   # not under pytest's tmp (0700: nobody could read)
    try:
        os.chmod(base, 0o755)
        run_dir = os.path.join(base, "run")
        proc = subprocess.run([PYTHON, "-c", HOLDER, run_dir], cwd=ROOT, env=run_env(), capture_output=True,
                              text=True, timeout=60)
        path = os.path.join(run_dir, lease.LEASE_FILE)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(f"refused: {run_dir}: this run could not renew its writer lease {path} "
                                      f"(Permission denied)"), proc.stdout + proc.stderr
        warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
        assert warnings == [f"fmnist-dist: warning: cannot renew the writer lease {path}: Permission denied; "
                            f"this run stops before its next write"], proc.stderr
    finally:
        shutil.rmtree(base)


def test_the_report_after_a_checkpoint_is_not_written_once_the_lease_is_lost(tmp_path):
    """Rank 0 writes a checkpoint, then the report: a takeover between the two stops the report too."""
    from fmnist_dist.training import rundir
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lease.hold(str(run_dir))
    try:
        owner = json.loads((run_dir / lease.LEASE_FILE).read_text())
        (run_dir / lease.LEASE_FILE).write_text(json.dumps({**owner, "host": "node-elsewhere", "token": "theirs"}))
        with pytest.raises(RunDirError, match="this run lost its writer lease .* to host node-elsewhere"):
            rundir.write_report(str(run_dir), {"status": "running"})
        assert not any(run_dir.glob("report*")) and not (run_dir / "epochs.csv").exists()
    finally:
        lease.release_held()
