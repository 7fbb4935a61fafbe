"""One writer per run directory, and resume that refuses what it cannot honour, with real processes:
a second writer (training or preflight) is refused and changes nothing; a stale lease is taken over
with a warning; a writer whose lease was taken stops without writing; --resume with --overwrite, of
nothing, or with a changed experiment is refused and changes nothing (byte for byte); a deliberate
change (--allow-change) is recorded; a requeued job keeps the configuration its run started with."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest
import yaml

from conftest import PYTHON, SHORT_CONFIG, record
from test_faults import Job, load, newest_checkpoint, rank_pids, resume, run, train, wait_for_checkpoint
from fmnist_dist import lease

EVERY = ["checkpoint.every_steps=10"]


def snapshot(run_dir: Path) -> dict[str, str]:
    """Every file under run_dir with the SHA-256 of its bytes."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def preempt(cmd: list[str], run_dir: Path, tmp: Path, name: str) -> None:
    """Start a one-process run and stop it with SIGTERM once it wrote a checkpoint (exit 75)."""
    with Job(cmd, tmp / "logs", name, run_dir) as job:
        wait_for_checkpoint(job, run_dir, 1)
        for pid in rank_pids(run_dir):
            os.kill(pid, signal.SIGTERM)
        assert job.wait(300) == 75, job.tail()


@pytest.fixture(scope="module")
def preempted(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("preempted")
    run_dir = tmp / "run"
    preempt(train(run_dir, *EVERY), run_dir, tmp, "preempted")
    return run_dir


@pytest.fixture
def copy(preempted, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(preempted, run_dir)
    return run_dir


def check_refused(rc: int, job: Job, fragment: str) -> None:
    """Exit 2 with one error line holding `fragment`, and no traceback."""
    errors = [ln for ln in job.stderr.splitlines() if "fmnist-dist: error:" in ln]
    assert rc == 2 and len(errors) == 1 and fragment in errors[0], job.tail()
    assert "Traceback" not in job.stderr, job.tail()


def refused(cmd: list[str], run_dir: Path, tmp: Path, name: str, message: str) -> float:
    """The command fails with one line holding `message` and leaves run_dir byte-identical."""
    before = snapshot(run_dir) if run_dir.exists() else None
    started = time.monotonic()
    rc, job = run(cmd, tmp, name)         # no run_dir: ending it must not end the owner's ranks too
    took = time.monotonic() - started
    check_refused(rc, job, message)
    assert (snapshot(run_dir) if run_dir.exists() else None) == before, f"{name} changed {run_dir}"
    return took


# ------------------------------------------------------------------------------------ resume


def test_resume_with_overwrite_is_refused(copy, tmp_path):
    took = refused(resume(copy) + ["--overwrite"], copy, tmp_path, "resume-overwrite",
                   "--overwrite contradict each other")
    record("train --resume DIR --overwrite", exit=2, seconds=round(took, 1), run_dir_unchanged=True)


def test_resume_of_nothing_is_refused(tmp_path):
    missing, empty = tmp_path / "missing", tmp_path / "empty"
    empty.mkdir()
    refused(resume(missing), missing, tmp_path, "resume-missing", f"--resume {missing}: no such run directory")
    assert not missing.exists()
    took = refused(resume(empty), empty, tmp_path, "resume-empty", f"--resume {empty}: nothing to resume: no checkpoint")
    record("train --resume of a missing directory, or of one without a checkpoint", times=2, exit=2,
           seconds=round(took, 1), run_dir_unchanged=True)


@pytest.mark.parametrize("key, value", [("train.lr", "0.01"), ("train.label_smoothing", "0.2"),
                                        ("train.warmup_epochs", "3.0"), ("train.augment_shift", "2")])
def test_resume_with_a_changed_experiment_is_refused_and_changes_nothing(copy, tmp_path, key, value):
    took = refused(resume(copy) + ["--set", f"{key}={value}"], copy, tmp_path, "resume-changed",
                   f"cannot resume with {key} changed")
    record(f"train --resume with {key} changed", exit=2, seconds=round(took, 1), run_dir_unchanged=True)


def test_refused_resume_leaves_a_resumable_run_and_epochs_can_be_extended(copy, tmp_path):
    refused(resume(copy) + ["--set", "train.lr=0.01"], copy, tmp_path, "resume-lr", "cannot resume with train.lr")
    rc, job = run(resume(copy) + ["--set", "train.epochs=3", "--allow-change", "train.epochs"], tmp_path,
                  "resume-longer", copy, timeout=600)
    assert rc == 0, job.tail()
    report = load(copy)
    assert report["segments"][-1]["config_changes"] == {"train.epochs": [2, 3]}
    assert [e["epoch"] for e in report["epochs"]] == [1, 2, 3]
    assert yaml.safe_load((copy / "config.yaml").read_text())["train"]["epochs"] == 3
    record("train --resume --set train.epochs=3 --allow-change train.epochs", exit=0, epochs=3,
           recorded=report["segments"][-1]["config_changes"])


def test_requeued_job_keeps_the_config_its_run_started_with(tmp_path):
    config = tmp_path / "mine.yaml"
    shutil.copy(SHORT_CONFIG, config)
    run_dir = tmp_path / "run"
    cmd = train(run_dir, *EVERY)
    cmd[cmd.index("--config") + 1] = str(config)
    preempt(cmd, run_dir, tmp_path, "first")
    started_with = yaml.safe_load((run_dir / "config.yaml").read_text())
    edited = yaml.safe_load(config.read_text())
    edited.setdefault("train", {})["lr"] = 0.05                    # the repository's config moved on
    config.write_text(yaml.safe_dump(edited))
    rc, job = run(cmd, tmp_path, "requeued", run_dir, timeout=600)  # the same command line
    assert rc == 0, job.tail()
    assert "now differs in train.lr: ignored" in job.stderr, job.tail()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["lr"] == started_with["train"]["lr"]
    assert load(run_dir)["config"]["train"]["lr"] == started_with["train"]["lr"]
    record("requeued job after the config file changed", exit=0, kept="RUN_DIR/config.yaml", warned="train.lr")


# ------------------------------------------------------------------------------------ one writer


def test_second_writer_is_refused_and_changes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    with Job(train(run_dir, *EVERY, "train.steps_per_epoch=200"), tmp_path / "logs", "owner", run_dir) as owner:
        wait_for_checkpoint(owner, run_dir, 1)
        pid = rank_pids(run_dir)[0]
        os.kill(pid, signal.SIGSTOP)                       # frozen, so the directory holds still
        try:
            expected = f"another job is writing this run directory: host {socket.gethostname()} pid {pid}"
            took = refused(train(run_dir), run_dir, tmp_path, "second", expected)
            refused(resume(run_dir), run_dir, tmp_path, "second-resume", expected)
            refused([PYTHON, "-m", "fmnist_dist", "preflight", "--config", SHORT_CONFIG, "--run-dir", str(run_dir)],
                    run_dir, tmp_path, "preflight", expected)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert owner.wait(600) == 0, owner.tail()
    assert load(run_dir)["status"] == "completed"
    assert not (run_dir / lease.LEASE_FILE).exists()
    record("a second writer (train, train --resume, preflight) while a run writes", times=3, exit=2,
           seconds=round(took, 1), run_dir_unchanged=True, owner="completed")


def write_lease(run_dir: Path, host: str, pid: int, age_s: float = 0.0) -> None:
    path = run_dir / lease.LEASE_FILE
    path.write_text(json.dumps({"host": host, "pid": pid, "pid_started": None, "job_id": "4242",
                                "since": "2026-01-01T00:00:00+00:00", "token": "someone-else"}))
    if age_s:
        past = time.time() - age_s
        os.utime(path, (past, past))


def test_stale_leases_are_taken_over_and_a_live_one_is_not(copy, tmp_path):
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    write_lease(copy, socket.gethostname(), dead)
    rc, job = run(resume(copy), tmp_path, "dead-owner", copy, timeout=600)
    assert rc == 0 and f"taking over the writer lease from host {socket.gethostname()} pid {dead}" in job.stderr, job.tail()
    assert f"process {dead} on this host has ended" in job.stderr

    # Another host's lease: refused while it is renewed, taken over once it is older than EXPIRE_S.
    run_dir = tmp_path / "second"
    preempt(train(run_dir, *EVERY), run_dir, tmp_path, "second-run")
    write_lease(run_dir, "node-elsewhere", 1234)
    refused(resume(run_dir), run_dir, tmp_path, "live-remote", "another job is writing this run directory: "
            "host node-elsewhere pid 1234, job 4242")
    write_lease(run_dir, "node-elsewhere", 1234, age_s=lease.EXPIRE_S + 60)
    rc, job = run(resume(run_dir), tmp_path, "stale-remote", run_dir, timeout=600)
    assert rc == 0 and "taking over the writer lease from host node-elsewhere pid 1234" in job.stderr, job.tail()
    assert "not renewed for" in job.stderr
    record("stale writer lease (owner's process gone; another host's lease not renewed for 150 s)", times=2,
           exit=0, outcome="taken over with a warning, run completed")


def read_if_there(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


def test_writer_that_lost_its_lease_stops_without_writing(tmp_path):
    run_dir = tmp_path / "run"
    with Job(train(run_dir, *EVERY, "train.steps_per_epoch=200"), tmp_path / "logs", "owner", run_dir) as owner:
        wait_for_checkpoint(owner, run_dir, 1)
        pid = rank_pids(run_dir)[0]
        os.kill(pid, signal.SIGSTOP)
        # Stopped anywhere: perhaps between the checkpoint and the report that follows it.
        before_ckpt, report_before = newest_checkpoint(run_dir), read_if_there(run_dir / "report.json")
        write_lease(run_dir, "node-elsewhere", 1234)        # as a takeover from another node would
        os.kill(pid, signal.SIGCONT)
        rc = owner.wait(600)
    check_refused(rc, owner, "this run lost its writer lease")
    assert "node-elsewhere" in owner.stderr
    assert newest_checkpoint(run_dir) == before_ckpt, "a checkpoint was written after the lease was lost"
    assert read_if_there(run_dir / "report.json") == report_before, "the report was written after the lease was lost"
    record("writer whose lease was taken over", exit=2, outcome="stopped before its next write, nothing written")
