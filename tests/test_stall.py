"""A rank that stops responding ends the job: SIGSTOP of one rank mid-epoch under horovodrun (Gloo
and MPI), mpirun and srun, and of rank 0 while it writes a checkpoint. Real processes and launchers;
each job must end within train.stall_timeout plus the launcher's teardown, with one line naming the
stopped rank and its host, no process left, and every checkpoint verifying."""
from __future__ import annotations

import ctypes
import os
import re
import select
import signal
import socket
import struct
import time
from pathlib import Path

import pytest

from conftest import need, record, run_env, wait_for
from slurm import slurm_cluster
from test_faults import (HOROVODRUN, RANKS, Job, load, need_mpi, processes_of, rank_pids, resume, train,
                         wait_for_checkpoint)
from fmnist_dist.training import checkpoint

STALL = 20                        # train.stall_timeout of these runs (default 90)
DEADLINE = STALL + 45             # the watchdog's timeout, its grace and the launcher's teardown
# Long enough epochs that the stop lands mid-epoch; checkpoints every 10 steps give marks to wait for.
LONG = ["train.steps_per_epoch=100", "train.batch_size=64", f"train.stall_timeout={STALL}", "checkpoint.every_steps=10"]
RANK_VARS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")
LOOPBACK = {"OMPI_MCA_btl_tcp_if_include": "lo", "OMPI_MCA_oob_tcp_if_include": "lo"}
IN_CREATE = 0x100


def rank_of(pid: int) -> int:
    env = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text(errors="replace").split("\0")
               if "=" in item)
    return int(next(env[v] for v in RANK_VARS if v in env))


def rank_pid(run_dir: Path, rank: int) -> int:
    pids = wait_for(lambda: len(rank_pids(run_dir)) == RANKS and rank_pids(run_dir), 60, "both ranks")
    return next(pid for pid in pids if rank_of(pid) == rank)


def launch(how: str, cmd: list[str], cluster=None) -> tuple[list[str], dict]:
    if how == "horovodrun-gloo":
        return [HOROVODRUN, "--gloo", "-np", str(RANKS), *cmd], run_env()
    if how == "horovodrun-mpi":
        return [HOROVODRUN, "--mpi", "-np", str(RANKS), *cmd], run_env(**LOOPBACK)
    if how == "mpirun":
        return ["mpirun", "-np", str(RANKS), "--bind-to", "none", *cmd], run_env(**LOOPBACK)
    return (["srun", "--mpi=pmix", f"--ntasks={RANKS}", "--cpus-per-task=1", "--kill-on-bad-exit=1", *cmd],
            run_env(SLURM_CONF=cluster.env["SLURM_CONF"]))


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    need("munged", "mungekey", "slurmctld", "slurmd", "srun")
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def check_ended(job: Job, run_dir: Path, stopped_at: float, victim: int) -> dict:
    """The job ended by itself within DEADLINE, naming the victim; nothing left; checkpoints verify."""
    rc = job.wait(DEADLINE + 60)
    took = time.monotonic() - stopped_at
    assert rc != 0, job.tail()
    assert took <= DEADLINE, f"the job took {took:.0f} s to end after the stop (limit {DEADLINE} s):\n{job.tail()}"
    lines = [ln for ln in (job.stderr + job.stdout).splitlines() if "fmnist-dist: error: stalled:" in ln]
    assert lines, f"no stall line:\n{job.tail()}"
    assert f"rank {victim} on {socket.gethostname()} " in lines[0], lines[0]
    assert not re.search(r'File ".*/fmnist_dist/', job.stderr), f"a traceback of ours:\n{job.tail()}"
    wait_for(lambda: not rank_pids(run_dir), 30, f"no rank left ({processes_of(run_dir)})")
    kept = checkpoint.list_checkpoints(str(run_dir))
    assert kept, "no checkpoint at all"
    for path in kept:
        checkpoint.verify(path)
    return {"seconds_to_end": round(took, 1), "exit": rc, "line": lines[0].split("error: ", 1)[1][:160],
            "checkpoints_verified": len(kept)}


@pytest.mark.parametrize("how", ["horovodrun-gloo", "horovodrun-mpi", "mpirun", "srun"])
def test_rank_stopped_mid_epoch_ends_the_job(how, tmp_path, request):
    need_mpi()
    cluster = request.getfixturevalue("slurm") if how == "srun" else None
    run_dir = tmp_path / "run"
    cmd, env = launch(how, train(run_dir, *LONG), cluster)
    with Job(cmd, tmp_path / "logs", how, run_dir, env=env) as job:
        wait_for_checkpoint(job, run_dir, 1)
        victim = rank_pid(run_dir, 1)
        os.kill(victim, signal.SIGSTOP)
        stopped_at = time.monotonic()
        facts = check_ended(job, run_dir, stopped_at, victim=1)
    report = load(run_dir)
    assert report["status"] == "failed" and "stalled" in report["error"], report.get("error")
    record(f"rank 1 stopped (SIGSTOP) mid-epoch under {how}", stall_timeout=STALL, lost_epochs=0, **facts)


class Creations:
    """inotify: the names created in a directory, as they appear (to stop a rank mid-write)."""

    def __init__(self, directory: Path):
        self.libc = ctypes.CDLL("libc.so.6", use_errno=True)
        self.fd = self.libc.inotify_init()
        if self.fd < 0 or self.libc.inotify_add_watch(self.fd, str(directory).encode(), IN_CREATE) < 0:
            pytest.fail(f"inotify on {directory}: errno {ctypes.get_errno()}")
        self.pending: list[str] = []

    def next(self, timeout: float) -> str | None:
        if not self.pending:
            if not select.select([self.fd], [], [], timeout)[0]:
                return None
            data, at = os.read(self.fd, 65536), 0
            while at < len(data):
                _, _, _, size = struct.unpack_from("iIII", data, at)
                self.pending.append(data[at + 16:at + 16 + size].rstrip(b"\0").decode())
                at += 16 + size
        return self.pending.pop(0)

    def close(self) -> None:
        os.close(self.fd)


def stop_inside_a_checkpoint_write(run_dir: Path, pid: int, attempts: int = 30) -> str:
    """SIGSTOP `pid` as soon as a checkpoint's temporary directory appears; returns its name once
    the stop landed before the rename (the write was under way), else thaws and tries the next."""
    root = run_dir / "checkpoints"
    watch = Creations(root)
    try:
        for _ in range(attempts):
            name = watch.next(60)
            if name is None:
                break
            if not name.startswith(".tmp-"):
                continue
            os.kill(pid, signal.SIGSTOP)
            if (root / name).exists():
                return name
            os.kill(pid, signal.SIGCONT)
    finally:
        watch.close()
    pytest.fail(f"could not stop rank 0 inside a checkpoint write in {attempts} checkpoints")


@pytest.mark.parametrize("how", ["horovodrun-gloo"])
def test_rank0_stopped_while_writing_a_checkpoint(how, tmp_path):
    need_mpi()
    run_dir = tmp_path / "run"
    cmd, env = launch(how, train(run_dir, *LONG))
    with Job(cmd, tmp_path / "logs", how, run_dir, env=env) as job:
        wait_for_checkpoint(job, run_dir, 1)
        half_written = stop_inside_a_checkpoint_write(run_dir, rank_pid(run_dir, 0))
        stopped_at = time.monotonic()
        facts = check_ended(job, run_dir, stopped_at, victim=0)
    assert half_written not in [Path(p).name for p in checkpoint.list_checkpoints(str(run_dir))]
    record(f"rank 0 stopped (SIGSTOP) while writing a checkpoint, under {how}", stall_timeout=STALL, lost_epochs=0, **facts)
    if how != "horovodrun-gloo":
        return
    # The checkpoints are intact: one process resumes from the newest, taking over the dead job's lease.
    with Job(resume(run_dir), tmp_path / "logs", "resume", run_dir) as job:
        assert job.wait(600) == 0, job.tail()
        assert "taking over the writer lease" in job.stderr, job.tail()
    assert load(run_dir)["status"] == "completed"
