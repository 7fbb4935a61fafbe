"""Checkpoints and report files under real faults, with real 2-rank runs (`horovodrun --gloo -np 2`,
the lean recipe): a training loss that becomes NaN, and report files, plots or the TensorBoard log
that cannot be written. Each ends with one line `fmnist-dist: error: ...` and exit 2 on every rank,
without a traceback, and leaves what was written before it intact. Each rank's own exit status is
recorded by a small shell around it: once one rank exits non-zero, horovodrun ends the others'
shells, and then reports their status as 143 whatever the rank itself returned.

One healthy run, stopped by SIGTERM after a few checkpoints (exit 75), is the starting point every
fault resumes from (a copy each). The divergence is real: `train.lr=1e30` (changed on resume with
--allow-change) takes the weights to ~1e30 in one step and the next loss is NaN, in fp32 and bf16
alike (the lean recipe from scratch diverges at step 2 with it, with adam or sgd, in both precisions).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PYTHON, ROOT, SHORT_CONFIG, VENV_BIN, need, record, run_env, unavailable, wait_for
from fmnist_dist import data
from fmnist_dist.training import checkpoint

HOROVODRUN = str(VENV_BIN / "horovodrun")
RANKS, BATCH, STEPS, EVERY = 2, 128, 60, 10
GLOBAL_BATCH = RANKS * BATCH
TIMEOUT = 900
SETTINGS = ["train.epochs=2", f"train.steps_per_epoch={STEPS}", f"train.batch_size={BATCH}",
            f"checkpoint.every_steps={EVERY}", "checkpoint.keep=2", "intel.mixed_precision=fp32",
            "report.plots=false", "report.tensorboard=false"]
RANK_LINE = re.compile(r"^\[(\d+)\]<std(?:out|err)>:")
# Runs the rank, then appends "RANK STATUS" to $EXITS; `trap : TERM` lets it outlive horovodrun's
# SIGTERM long enough to see the rank end (the rank itself handles SIGTERM as a stop request).
RECORD_EXIT = 'trap : TERM; "$@"; status=$?; echo "$HOROVOD_RANK $status" >> "$EXITS"; exit $status'


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def cmdlines() -> dict[int, list[str]]:
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                raw = Path(f"/proc/{entry}/cmdline").read_bytes()
                if raw:
                    found[int(entry)] = raw.decode(errors="replace").split("\0")[:-1]
    return found


def rank_pids(run_dir: Path) -> list[int]:
    return sorted(pid for pid, argv in cmdlines().items()
                  if argv[:4] == [PYTHON, "-m", "fmnist_dist", "train"] and str(run_dir) in argv)


class Job:
    """`horovodrun --gloo -np 2 python -m fmnist_dist train ARGS`, output in files."""

    def __init__(self, run_dir: Path, args: list[str], logs: Path, name: str):
        logs.mkdir(parents=True, exist_ok=True)
        self.run_dir, self.out, self.err = run_dir, logs / f"{name}.out", logs / f"{name}.err"
        self.exits = logs / f"{name}.exits"
        cmd = [HOROVODRUN, "--gloo", "-np", str(RANKS), "sh", "-c", RECORD_EXIT, "sh",
               PYTHON, "-m", "fmnist_dist", "train", *args]
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(EXITS=str(self.exits)), stdout=out, stderr=err)
        self.started = time.monotonic()

    @property
    def log(self) -> str:
        return self.out.read_text(errors="replace") + self.err.read_text(errors="replace")

    def rank_exits(self) -> dict[int, int]:
        """{rank: its exit status}, as the shell around each rank saw it."""
        lines = self.exits.read_text().split("\n") if self.exits.exists() else []
        return dict(tuple(map(int, line.split())) for line in lines if line.strip())

    def wait(self) -> tuple[int, float]:
        try:
            rc = self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"still running after {TIMEOUT} s (a hang):\n{self.log[-4000:]}")
        return rc, time.monotonic() - self.started

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(20)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(20)
        for pid in rank_pids(self.run_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def run(run_dir: Path, args: list[str], logs: Path, name: str) -> tuple[int, float, str, dict[int, int]]:
    """(horovodrun's exit status, seconds, the log, {rank: exit status})."""
    job = Job(run_dir, args, logs, name)
    try:
        rc, seconds = job.wait()
    finally:
        job.stop()
    time.sleep(0.5)                      # a rank's shell may record its status just after horovodrun returns
    return rc, seconds, job.log, job.rank_exits()


def check_fails_everywhere(rc: int, log: str, exits: dict[int, int], expected: str) -> str:
    """Every rank exited 2 (and so horovodrun failed); rank 0 printed the one error line (a full
    match of the regex `expected`), and no rank printed a traceback."""
    assert rc != 0, log[-4000:]
    assert exits == {0: 2, 1: 2}, f"{exits}\n{log[-4000:]}"
    rank_lines = [RANK_LINE.sub("", line) for line in log.splitlines() if RANK_LINE.match(line)]
    errors = [line for line in rank_lines if line.startswith("fmnist-dist: error:")]
    assert len(errors) == 1, log[-4000:]
    assert re.fullmatch(expected, errors[0]), f"{errors[0]}\n!~ {expected}"
    assert not [line for line in rank_lines if "Traceback" in line], log[-6000:]
    return errors[0]


def digests(run_dir: Path) -> dict[str, str]:
    """SHA-256 of every file of the run directory (checkpoints included) but the writer's lease."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != "writer.lock"}


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """A healthy 2-rank run, SIGTERM once it has checkpointed 30 steps: exit 75, resumable."""
    need("mpirun", root=False)
    if not Path(data.DEBIAN_DIR).is_dir():
        unavailable(f"no Fashion-MNIST in {data.DEBIAN_DIR} (apt-get install {data.DEBIAN_PACKAGE})")
    tmp = tmp_path_factory.mktemp("stopped")
    run_dir = tmp / "run"
    job = Job(run_dir, ["--config", SHORT_CONFIG, "--run-dir", str(run_dir), *sets(*SETTINGS)], tmp / "logs", "healthy")
    try:
        def past_30_steps():
            assert job.proc.poll() is None, job.log[-4000:]
            found = checkpoint.list_checkpoints(str(run_dir))
            return found and checkpoint.number(found[-1])[0] >= 3 * EVERY * GLOBAL_BATCH
        wait_for(past_30_steps, TIMEOUT, "a checkpoint at 30 steps", interval=0.2)
        for pid in rank_pids(run_dir):
            os.kill(pid, signal.SIGTERM)
        job.wait()
    finally:
        job.stop()
    time.sleep(0.5)
    # Rank 0 gives the job's status (75), last; the others exit 0 (horovodrun --gloo itself exits 1).
    assert job.rank_exits() == {0: 75, 1: 0}, job.log[-4000:]
    assert json.loads((run_dir / "report.json").read_text())["status"] == "preempted"
    return run_dir


def copy_of(stopped_run: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(stopped_run, run_dir)
    (run_dir / "writer.lock").unlink(missing_ok=True)
    return run_dir


# ---------------------------------------------------------------------------------------------
# A training loss that becomes NaN


# fp32 runs on every CPU; the bf16 path (train.lr=1e30 gives NaN at step 2 there too) is the same code.
@pytest.mark.parametrize("precision", ["fp32"])
def test_a_nonfinite_loss_stops_every_rank_and_keeps_the_good_checkpoints(stopped_run, tmp_path, precision):
    run_dir = copy_of(stopped_run, tmp_path)
    before = digests(run_dir / "checkpoints")
    kept = checkpoint.list_checkpoints(str(run_dir))
    resumed_at = checkpoint.number(kept[-1])[0] // GLOBAL_BATCH              # global steps done
    args = ["--resume", str(run_dir), *sets("train.lr=1e30", f"intel.mixed_precision={precision}"),
            "--allow-change", "train.lr", "--allow-change", "intel.mixed_precision"]
    rc, seconds, log, exits = run(run_dir, args, tmp_path / "logs", f"nan-{precision}")

    epoch, step = resumed_at // STEPS + 1, resumed_at % STEPS + 2               # the second step after the resume
    line = check_fails_everywhere(rc, log, exits, (
        rf"fmnist-dist: error: the training loss became (nan|inf|-inf) at epoch {epoch}, step {step} \(first seen on "
        rf"rank [01]\); all ranks stopped at the next check, and no checkpoint was written after it; the last good "
        rf"checkpoint is {re.escape(kept[-1])}"))
    assert digests(run_dir / "checkpoints") == before, "a checkpoint written, removed or changed after the NaN"
    for path in kept:
        saved = checkpoint.verify(path)
        assert all(v == v and abs(v) != float("inf") for v in saved["train_metrics"].values()), saved["train_metrics"]

    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "failed" and report["error"] == "DivergenceError: " + line.split("error: ", 1)[1]
    failure = report["failure"]
    assert (failure["epoch"], failure["step"], failure["run_step"]) == (epoch, step, resumed_at + 2), failure
    assert failure["reason"] == f"the training loss became {failure['loss']}"
    segment = report["segments"][-1]
    assert segment["end"] == "failed" and segment["resumed_from"] == kept[-1]
    assert segment["code_version"] == segment["checkpoint_code_version"] == checkpoint.code_version()
    assert f"failed (DivergenceError: the training loss became {failure['loss']} at epoch {epoch}, step {step}" in \
        (run_dir / "report.md").read_text()
    record(f"training loss NaN (train.lr=1e30 on resume, {precision}, horovodrun --gloo -np 2)",
           exit=rc, rank_exits=exits, seconds=round(seconds, 1), nan_at_step=resumed_at + 2,
           checkpoints_kept=len(kept), checkpoint_after_nan=False, lost_epochs=0, hang=False)


# ---------------------------------------------------------------------------------------------
# Report files, plots, TensorBoard that cannot be written


BLOCKED = {
    # what is in the way, where; the settings; the error (a regex; RUN is the run directory)
    "report.md": ("dir", [], r"RUN/report\.md: could not write the report: Is a directory"),
    "tensorboard": ("file", ["report.tensorboard=true", "checkpoint.every_steps=0"],
                    r"RUN/tensorboard: could not write the TensorBoard log: Not a directory"),
    "accuracy_loss.png": ("dir", ["report.plots=true"],
                          r"RUN/accuracy_loss\.png: could not write the plot: Is a directory \(to draw the plots "
                          r"again: fmnist-dist report RUN --plots RUN\); the run itself finished, its report is "
                          r"complete in RUN/report\.md"),
}


@pytest.mark.parametrize("blocked", list(BLOCKED))
def test_a_file_that_cannot_be_written_fails_every_rank_in_one_line(stopped_run, tmp_path, blocked):
    """Something sits where the file must go (it fails as root too). report.md: at the first
    checkpoint of the resumed run; TensorBoard: at the end of its epoch (written then, checked at the
    checkpoint that follows); the plots: once the run has finished. config.yaml records the resumed
    run's settings, so it is rewritten by design."""
    run_dir = copy_of(stopped_run, tmp_path)
    kind, settings, expected = BLOCKED[blocked]
    in_the_way = run_dir / blocked
    in_the_way.unlink(missing_ok=True)
    in_the_way.mkdir() if kind == "dir" else in_the_way.write_text("in the way\n")
    before = digests(run_dir)
    args = ["--resume", str(run_dir), *sets("checkpoint.keep=10", *settings)]     # keep every earlier checkpoint
    rc, seconds, log, exits = run(run_dir, args, tmp_path / "logs", f"blocked-{blocked}")

    check_fails_everywhere(rc, log, exits, "fmnist-dist: error: " + expected.replace("RUN", re.escape(str(run_dir))))
    after = digests(run_dir)
    finished = blocked.endswith(".png")
    rewritten = {"config.yaml"} | ({"report.json", "report.md", "epochs.csv"} if finished else set())
    assert {k: v for k, v in after.items() if k in before and k not in rewritten} == \
        {k: v for k, v in before.items() if k not in rewritten}, "a file written earlier changed"
    assert not [k for k in after if os.path.basename(k).startswith(".tmp-")], "temporary files left"
    for path in checkpoint.list_checkpoints(str(run_dir)):
        checkpoint.verify(path)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == ("completed" if finished else "preempted"), report["status"]
    record(f"{blocked} cannot be written (a {'directory' if kind == 'dir' else 'file'} in the way; horovodrun --gloo -np 2)",
           exit=rc, rank_exits=exits, seconds=round(seconds, 1), earlier_files_intact=True, hang=False)
