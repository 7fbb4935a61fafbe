"""Fault injection with real processes (no mocks): SIGTERM and resume, kill -9 of a rank under
horovodrun and mpirun, bad input of every kind, and a preempted job requeued under a real Slurm
cluster and rerun under PBS.

Runs are short (2 epochs x 60 steps on 2 ranks); one uninterrupted run (module fixture) is the
reference every interrupted run is compared with. Interruption points are random: the seed is
printed (and in every failure message); FMNIST_FAULT_SEED=N repeats a choice. In CI (CI=true)
nothing here may skip. Every process is found by its unique run directory and ended by its pid.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (FAULT_SEED, ROOT, ROOT_MPI_ENV, record, SHORT_CONFIG, VENV, last_line, need, run_env, short_host, unavailable, wait_for)
from pbs import pbs_job_env, unique_job_id, write_nodefile
from slurm import slurm_cluster
from fmnist_dist import data
from fmnist_dist.training import checkpoint

PYTHON = str(VENV / "bin" / "python")
HOROVODRUN = str(VENV / "bin" / "horovodrun")
DATASET = Path(data.DEBIAN_DIR)
EPOCHS, STEPS, BATCH, RANKS = 2, 60, 128, 2
GLOBAL_BATCH = RANKS * BATCH
# The lean recipe (a ~5 MB checkpoint: the full-disk test sizes its tmpfs by it), batch pinned.
CONFIG = SHORT_CONFIG
SHORT = [f"train.epochs={EPOCHS}", f"train.steps_per_epoch={STEPS}", f"train.batch_size={BATCH}",
         "report.plots=false", "report.tensorboard=false"]
EVERY = 20                        # checkpoint.every_steps of the interrupted runs: progress marks
RUN_TIMEOUT = 900                 # one short run on a busy 2-core machine, generously bounded
FAIL_TIMEOUT = 300                # a run that must fail at start-up
KILL_DEADLINE = 60                # the bar: a job with a dead rank ends within 60 s
LOOPBACK_MPI = {"OMPI_MCA_btl_tcp_if_include": "lo", "OMPI_MCA_oob_tcp_if_include": "lo"}
CKPT_RE = re.compile(r"examples-(\d+)$")


def sets(items) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def train(run_dir: Path, *extra: str, data_dir: Path | None = None) -> list[str]:
    cmd = [PYTHON, "-m", "fmnist_dist", "train", "--config", CONFIG, "--run-dir", str(run_dir),
           *sets([*SHORT, *extra])]
    return cmd + (["--data-dir", str(data_dir)] if data_dir else [])


def resume(run_dir: Path) -> list[str]:
    return [PYTHON, "-m", "fmnist_dist", "train", "--resume", str(run_dir)]


def horovodrun(cmd: list[str]) -> list[str]:
    return [HOROVODRUN, "-np", str(RANKS), *cmd]


def mpirun(cmd: list[str]) -> list[str]:
    return ["mpirun", "-np", str(RANKS), "--bind-to", "none", *cmd]


# ---------------------------------------------------------------------------------------------
# Processes: found by their unique run directory, ended by pid


def cmdlines() -> dict[int, list[str]]:
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                raw = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if raw:
                found[int(entry)] = raw.decode(errors="replace").split("\0")[:-1]
    return found


def rank_pids(run_dir: Path) -> list[int]:
    """The training ranks of this run: `<venv python> -m fmnist_dist train ... <run_dir> ...` (not
    horovodrun's or mpirun's own command lines, which also hold the train command)."""
    return sorted(pid for pid, argv in cmdlines().items()
                  if argv[:4] == [PYTHON, "-m", "fmnist_dist", "train"] and str(run_dir) in argv)


def processes_of(run_dir: Path) -> dict[int, str]:
    """Every process whose command line names this run directory (launchers, shells, ranks)."""
    return {pid: " ".join(argv) for pid, argv in cmdlines().items() if str(run_dir) in " ".join(argv)}


class Job:
    """A launched command with stdout/stderr in files (readable while it runs)."""

    def __init__(self, cmd: list[str], logs: Path, name: str, run_dir: Path | None = None, env=None, cwd=ROOT):
        logs.mkdir(parents=True, exist_ok=True)
        self.out, self.err, self.run_dir = logs / f"{name}.out", logs / f"{name}.err", run_dir
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=cwd, env=env or run_env(), stdout=out, stderr=err)
        self.started = time.monotonic()

    @property
    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def tail(self, n: int = 4000) -> str:
        return f"--- stdout\n{self.stdout[-n:]}\n--- stderr\n{self.stderr[-n:]}\n(fault seed {FAULT_SEED})"

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"{self.proc.args[0]} still running after {timeout:.0f} s (a hang):\n{self.tail()}")

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"exited early with {self.proc.returncode}:\n{self.tail()}")
        return True

    def stop(self) -> None:
        """End what we started, by pid: the launcher, then any rank of our run directory left over."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(20)
        if self.run_dir is not None:
            for pid in rank_pids(self.run_dir):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def run(cmd: list[str], tmp: Path, name: str, run_dir: Path | None = None, timeout: float = FAIL_TIMEOUT,
        env=None) -> tuple[int, Job]:
    with Job(cmd, tmp / "logs", name, run_dir, env) as job:
        return job.wait(timeout), job


def need_mpi() -> None:
    need("mpirun", root=False)
    if not DATASET.is_dir():
        unavailable(f"no Fashion-MNIST in {DATASET} (apt-get install {data.DEBIAN_PACKAGE})")


def need_root() -> None:
    if os.geteuid() != 0:
        unavailable("needs root (mount)")


# ---------------------------------------------------------------------------------------------
# Run directories


def load(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def samples_of(path: str | Path) -> int:
    return int(CKPT_RE.search(str(path)).group(1))


def newest_checkpoint(run_dir: Path) -> int:
    found = checkpoint.list_checkpoints(str(run_dir))
    return samples_of(found[-1]) if found else -1


def wait_for_checkpoint(job: Job, run_dir: Path, samples: int, timeout: float = RUN_TIMEOUT) -> int:
    """Until a checkpoint of at least `samples` examples is on disk (the run is past that step)."""
    return wait_for(lambda: job.alive() and newest_checkpoint(run_dir) >= samples and newest_checkpoint(run_dir),
                    timeout, f"a checkpoint at {samples} examples in {run_dir}", interval=0.2)


def signal_ranks(run_dir: Path, sig: int, only: int | None = None) -> list[int]:
    pids = rank_pids(run_dir)
    assert len(pids) == RANKS, f"expected {RANKS} ranks of {run_dir}, found {processes_of(run_dir)}"
    for pid in pids if only is None else [pids[only]]:
        os.kill(pid, sig)
    return pids


def steps_per_rank(report: dict) -> list[list[int]]:
    return [[r["steps"] for r in e["ranks"]] for e in report["epochs"]]


def total_steps(report: dict) -> int:
    return sum(sum(steps) for steps in steps_per_rank(report))


def global_step(segment: dict) -> int:
    """Where a segment started, in global steps from the start of the run."""
    return (segment["start_epoch"] - 1) * STEPS + segment["start_position"] // GLOBAL_BATCH


def check_complete(report: dict, baseline: dict | None = None, segments: int = 1) -> None:
    assert report["status"] == "completed" and report["error"] is None
    assert steps_per_rank(report) == [[STEPS] * RANKS] * EPOCHS, "a step repeated or skipped"
    assert [e["epoch"] for e in report["epochs"]] == list(range(1, EPOCHS + 1)), "an epoch lost"
    assert len(report["segments"]) == segments and report["segments"][-1]["end"] == "completed"
    assert report["results"]["test_total"] == 10000
    if baseline is not None:
        assert total_steps(report) == total_steps(baseline)
        assert report["data"] == baseline["data"]
        assert abs(report["results"]["test_accuracy"] - baseline["results"]["test_accuracy"]) <= 0.003, \
            (report["results"]["test_accuracy"], baseline["results"]["test_accuracy"])


def check_training_time_sums_segments(report: dict) -> None:
    """The report's training time covers every segment: rank 0's time of each epoch (summed over
    the segments it spans) adds up to the segments' training time, and the total is their sum."""
    segments = sum(s["training_s"] for s in report["segments"])
    # every segment that had steps left trained (one stopped by a signal at the very end has none)
    assert all(s["training_s"] > 0 for s in report["segments"] if global_step(s) < EPOCHS * STEPS)
    rank0 = sum(r["data_s"] + r["fit_s"] + r["wait_s"] for e in report["epochs"] for r in e["ranks"] if r["rank"] == 0)
    assert rank0 == pytest.approx(segments, rel=1e-6)
    assert report["timing"]["training_s"] == pytest.approx(segments, rel=0.05)   # slowest rank per epoch


def stderr_line(text: str, prefix: str) -> str:
    """The line of a (possibly horovodrun-prefixed `[1,0]<stderr>:`) log that starts with prefix."""
    for line in text.splitlines():
        line = re.sub(r"\[\d+,\d+\]<std(?:err|out)>:", "", line)   # anywhere: chunks of two ranks interleave
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no line starting with {prefix!r} in:\n{text[-3000:]}")


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "fmnist-dist: error:" in line]


# ---------------------------------------------------------------------------------------------
# The uninterrupted reference run


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> dict:
    need_mpi()
    tmp = tmp_path_factory.mktemp("baseline")
    run_dir = tmp / "run"
    rc, job = run(horovodrun(train(run_dir)), tmp, "baseline", run_dir, RUN_TIMEOUT)
    assert rc == 0, job.tail()
    report = load(run_dir)
    check_complete(report)
    print(f"baseline: test accuracy {report['results']['test_accuracy']:.4f}, "
          f"{time.monotonic() - job.started:.0f} s")
    return {"run_dir": run_dir, "report": report}


def step_seconds(baseline: dict) -> float:
    """Seconds per step on this machine (the reference run's second epoch: no tracing)."""
    return baseline["report"]["epochs"][-1]["training_s"] / STEPS


# ---------------------------------------------------------------------------------------------
# 1. SIGTERM to the ranks at random steps, then --resume


@pytest.mark.slow
def test_sigterm_then_resume_matches_the_uninterrupted_run(baseline, tmp_path):
    """Two random interruption points (one per epoch) in one run: SIGTERM to both ranks of
    `horovodrun -np 2`, exit 75, resume, SIGTERM again, resume to the end."""
    rng = random.Random(FAULT_SEED)
    step_s = step_seconds(baseline)
    run_dir = tmp_path / "run"
    cmds = [horovodrun(train(run_dir, f"checkpoint.every_steps={EVERY}")), horovodrun(resume(run_dir))]
    stops: list[int] = []                                # global steps at which the segments stopped
    for segment, cmd in enumerate(cmds, 1):
        # The signal goes out once the run is past a random step (seen by its first checkpoint at or
        # after it: one every EVERY steps) plus a random part of 10 steps; the ranks stop at the next
        # agreed check (every 10 steps). Segment 1 stops in epoch 1 (or at its end), segment 2 in epoch 2.
        target = rng.randrange(10, 45) if segment == 1 else rng.randrange(max(stops[-1], STEPS) + 5, 2 * STEPS - 20)
        delay = rng.uniform(0, 10 * step_s)
        with Job(cmd, tmp_path / "logs", f"segment{segment}", run_dir) as job:
            reached = wait_for_checkpoint(job, run_dir, target * GLOBAL_BATCH)
            time.sleep(delay)
            signal_ranks(run_dir, signal.SIGTERM)
            rc = job.wait(RUN_TIMEOUT)
        assert rc == 75, f"segment {segment}: exit {rc}\n{job.tail()}"
        assert stderr_line(job.stderr, "fmnist-dist: preempted: stop signal (SIGTERM)") == (
            f"fmnist-dist: preempted: stop signal (SIGTERM); checkpoint and partial report in {run_dir}; "
            f"resume with: fmnist-dist train --resume {run_dir} (exit 75)")
        partial = load(run_dir)
        assert partial["status"] == "preempted" and partial["stopped"] == "stop signal (SIGTERM)"
        assert partial["segments"][-1]["end"] == "preempted"
        stops.append(newest_checkpoint(run_dir) // GLOBAL_BATCH)
        assert reached // GLOBAL_BATCH <= stops[-1] <= 2 * STEPS
        assert len(partial["epochs"]) == stops[-1] // STEPS     # every finished epoch is in the report
        if segment > 1:
            assert stderr_line(job.stdout, "resuming from").startswith(f"resuming from {run_dir}/checkpoints/")
    print(f"fault seed {FAULT_SEED}: stopped after global steps {stops} of {EPOCHS * STEPS}")

    rc, job = run(horovodrun(resume(run_dir)), tmp_path, "segment3", run_dir, RUN_TIMEOUT)
    assert rc == 0, job.tail()
    report = load(run_dir)
    check_complete(report, baseline["report"], segments=3)
    assert [s["end"] for s in report["segments"]] == ["preempted", "preempted", "completed"]
    assert [global_step(s) for s in report["segments"]] == [0, *stops]
    assert [s["resumed_from"] for s in report["segments"][1:]] == [
        str(run_dir / "checkpoints" / f"examples-{n * GLOBAL_BATCH:010d}") for n in stops]
    assert {s["world_size"] for s in report["segments"]} == {RANKS}
    check_training_time_sums_segments(report)
    assert len((run_dir / "epochs.csv").read_text().splitlines()) == 1 + EPOCHS * RANKS
    for stop in stops:
        record("SIGTERM to both ranks (horovodrun -np 2), then --resume", stopped_at_step=stop,
               test_accuracy=report["results"]["test_accuracy"],
               uninterrupted=baseline["report"]["results"]["test_accuracy"], lost_epochs=0, hang=False)


# ---------------------------------------------------------------------------------------------
# 2. kill -9 of one rank


def kill_one_rank(tmp: Path, launcher, victim: int, checkpoints: int) -> dict:
    """Start a 2-rank run, let it write `checkpoints` checkpoints, kill -9 rank `victim`, and
    time how long the job takes to end."""
    rng = random.Random(FAULT_SEED + victim)
    run_dir = tmp / "run"
    with Job(launcher(train(run_dir, f"checkpoint.every_steps={EVERY}")), tmp / "logs", "killed", run_dir) as job:
        wait_for_checkpoint(job, run_dir, checkpoints * EVERY * GLOBAL_BATCH)
        time.sleep(rng.uniform(0, 3))
        pids = signal_ranks(run_dir, signal.SIGKILL, only=victim)
        killed = time.monotonic()
        rc = job.wait(KILL_DEADLINE + 60)
        seconds = time.monotonic() - killed
        with contextlib.suppress(TimeoutError):      # the launcher has waited for its children; allow a moment
            wait_for(lambda: not processes_of(run_dir), 10, "no process of the run", interval=0.5)
        left = processes_of(run_dir)
    return {"run_dir": run_dir, "rc": rc, "seconds": seconds, "job": job, "pid": pids[victim], "left": left,
            "launcher": launcher.__name__}


def check_killed(result: dict, victim: int) -> None:
    job, run_dir = result["job"], result["run_dir"]
    print(f"job ended {result['seconds']:.1f} s after kill -9 of rank {victim} (exit {result['rc']})")
    assert result["rc"] != 0, job.tail()
    assert result["seconds"] <= KILL_DEADLINE, job.tail()
    assert not result["left"], f"left behind: {result['left']}"
    # The log names the rank and the host that failed (Open MPI's message, under horovodrun too).
    assert re.search(rf"process rank {victim} with PID \d+ on node {re.escape(short_host())} "
                     rf"exited on signal 9 \(Killed\)", job.stdout + job.stderr), job.tail()
    # Every checkpoint left is complete and verifies; the newest is at or after the last mark.
    # A kill that lands mid-write leaves one temporary directory: never listed, and cleared by the
    # next run before it writes (clear_leftovers).
    found = checkpoint.list_checkpoints(str(run_dir))
    assert found and all(Path(p).name.startswith("examples-") for p in found)
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) <= 1, leftovers
    states = [checkpoint.verify(path) for path in found]
    assert [s["samples_done"] for s in states] == [samples_of(path) for path in found]
    # The report and epoch log on disk hold every epoch of the newest checkpoint (or, if the kill
    # came between writing the two, of the one before): complete JSON, no epoch lost or half-written.
    # A checkpoint cannot hold the time it took to write itself: rank 0's checkpoint_s of the
    # checkpoint's own epoch is added to the report afterwards, so it is left out of the comparison.
    report = load(run_dir)
    assert report["status"] == "running"
    assert without_checkpoint_s(report["epochs"]) in [without_checkpoint_s(s["epochs"]) for s in states[-2:]]
    assert len((run_dir / "epochs.csv").read_text().splitlines()) == 1 + len(report["epochs"]) * RANKS
    record(f"kill -9 of rank {victim} ({result['launcher']} -np 2)", seconds_to_exit=round(result["seconds"], 1),
           exit=result["rc"], checkpoints_verified=len(found), lost_epochs=0, hang=False)


def without_checkpoint_s(epochs: list[dict]) -> list[dict]:
    return [{**e, "ranks": [{k: v for k, v in r.items() if k != "checkpoint_s"} for r in e["ranks"]]}
            for e in epochs]


@pytest.fixture(scope="module")
def crashed_under_horovodrun(tmp_path_factory) -> dict:
    need_mpi()
    """kill -9 of rank 1 under horovodrun after two mid-run checkpoints."""
    return kill_one_rank(tmp_path_factory.mktemp("kill9-horovodrun"), horovodrun, victim=1, checkpoints=2)


@pytest.mark.slow
def test_kill9_one_rank_under_horovodrun(crashed_under_horovodrun):
    check_killed(crashed_under_horovodrun, victim=1)


@pytest.mark.slow
def test_kill9_one_rank_under_mpirun(tmp_path):
    need_mpi()
    check_killed(kill_one_rank(tmp_path, mpirun, victim=0, checkpoints=1), victim=0)


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_and_the_crashed_run_completes(crashed_under_horovodrun, baseline,
                                                                           tmp_path):
    """After the kill -9, the newest checkpoint is damaged too: resume says so, falls back to the
    previous one and finishes the run exactly (no step repeated or skipped, no epoch lost)."""
    run_dir = tmp_path / "run"
    shutil.copytree(crashed_under_horovodrun["run_dir"], run_dir)
    *_, previous, newest = checkpoint.list_checkpoints(str(run_dir))
    weights = Path(newest) / "weights.data-00000-of-00001"
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    weights.write_bytes(bytes(blob))
    rc, job = run(horovodrun(resume(run_dir)), tmp_path, "resume", run_dir, RUN_TIMEOUT)
    assert rc == 0, job.tail()
    warning = stderr_line(job.stderr, f"fmnist-dist: warning: checkpoint {newest} is unusable")
    assert re.fullmatch(rf"fmnist-dist: warning: checkpoint {re.escape(newest)} is unusable \(weights\.data-00000-of-"
                        rf"00001 is corrupt \(SHA-256 [0-9a-f]{{12}}…, expected [0-9a-f]{{12}}…\)\); trying the "
                        rf"previous one", warning), warning
    assert stderr_line(job.stdout, "resuming from").startswith(f"resuming from {previous}: ")
    report = load(run_dir)
    check_complete(report, baseline["report"], segments=2)
    assert report["segments"][0]["end"] == "interrupted"         # died without a clean stop
    assert report["segments"][1]["resumed_from"] == previous
    check_training_time_sums_segments(report)
    record("corrupt newest checkpoint, resume after kill -9", fell_back_to=Path(previous).name,
           test_accuracy=report["results"]["test_accuracy"], lost_epochs=0, hang=False)


# ---------------------------------------------------------------------------------------------
# 3. Bad input: one line naming the thing, non-zero exit, nothing earlier overwritten


@pytest.fixture
def data_copy(tmp_path) -> Path:
    need_mpi()
    copy = tmp_path / "data"
    copy.mkdir()
    for name in data.FILES.values():
        shutil.copy(DATASET / f"{name}.gz", copy / f"{name}.gz")
    return copy


def gunzip_to_raw(gz: Path) -> Path:
    raw = gz.with_suffix("")
    raw.write_bytes(gzip.decompress(gz.read_bytes()))
    gz.unlink()
    return raw


def decompressed_before_eof(path: Path) -> int:
    n = 0
    with gzip.open(path, "rb") as f:
        with contextlib.suppress(EOFError):
            while chunk := f.read(1 << 20):
                n += len(chunk)
    return n


# TensorFlow words a full disk as "{{function_node __wrapped__SaveV2...}} <temp file>; No space left on
# device [Op:SaveV2]"; checkpoint.save should keep only the cause. Until then the
# test accepts that wording around the cause.
NO_SPACE = (r"No space left on device", r"(?:\{\{function_node [^}]*\}\} \S+; )?No space left on device(?: \[Op:\w+\])?")


def check_fails(rc: int, job: Job, message: str, reason: tuple[str, str] | None = None) -> None:
    """Non-zero exit, and the last error line is `fmnist-dist: error: <message>` (reason: a part of
    the message given as (text, regex)), printed once, without a traceback."""
    assert rc != 0, job.tail()
    errors = error_lines(job.stderr)
    expected = re.escape(f"fmnist-dist: error: {message}")
    if reason is not None:
        expected = expected.replace(re.escape(reason[0]), reason[1], 1)
    assert errors and re.fullmatch(expected, re.sub(r"\[\d+,\d+\]<std(?:err|out)>:", "", errors[-1])), job.tail()
    assert len(errors) == 1, f"one line, from rank 0 only:\n{job.tail()}"
    assert "Traceback" not in job.stderr, job.tail()
    record(f"bad input ({job.out.stem})", exit=rc, seconds=round(time.monotonic() - job.started, 1), hang=False)


@pytest.mark.slow
def test_truncated_raw_and_corrupt_data_files(data_copy, tmp_path):
    """A raw file cut short, and one with a changed byte (right size, wrong content)."""
    raw = gunzip_to_raw(data_copy / "t10k-labels-idx1-ubyte.gz")
    good = raw.read_bytes()
    raw.write_bytes(good[:5000])
    rc, job = run(train(tmp_path / "run1", data_dir=data_copy), tmp_path, "truncated-raw-file", tmp_path / "run1")
    check_fails(rc, job, f"{raw}: size is 5000 bytes, expected 10008 (the file is truncated or corrupt)")
    bad = bytearray(good)
    bad[5000] = (bad[5000] + 1) % 10                                    # still a valid label
    raw.write_bytes(bytes(bad))
    rc, job = run(train(tmp_path / "run2", data_dir=data_copy), tmp_path, "corrupt-raw-file", tmp_path / "run2")
    check_fails(rc, job, f"{raw}: SHA-256 of the data is {hashlib.sha256(bad).hexdigest()}, expected "
                         f"{data.SHA256['test_labels']} (the file is corrupt or not the original Fashion-MNIST)")
    assert not (tmp_path / "run1").exists() and not (tmp_path / "run2").exists()


@pytest.mark.slow
def test_data_directory_disappears_after_the_launch(data_copy, tmp_path):
    """The directory is there when the job starts and gone when the ranks read it (removed while
    they import TensorFlow): the run fails naming it, on both ranks, in one line."""
    run_dir = tmp_path / "run"
    with Job(mpirun(train(run_dir, data_dir=data_copy)), tmp_path / "logs", "data-dir-vanished-2-ranks", run_dir) as job:
        # After the ranks' quick data check, while they load TensorFlow.
        wait_for(lambda: job.alive() and len(rank_pids(run_dir)) == RANKS
                 and all(loading_tensorflow(pid) for pid in rank_pids(run_dir)), 120, "the ranks", interval=0.05)
        shutil.rmtree(data_copy)
        rc = job.wait(FAIL_TIMEOUT)
    check_fails(rc, job, f"Fashion-MNIST not found in {data_copy} (data.dir / --data-dir): no such directory. "
                         f"Expected {', '.join(data.FILES.values())} (each raw or .gz). Only this directory is "
                         f"searched when data.dir is set; unset it to search ${data.ENV_VAR}, {data.DEBIAN_DIR} "
                         f"and the Keras cache.")
    assert not run_dir.exists()


def loading_tensorflow(pid: int) -> bool:
    try:
        return "libtensorflow" in Path(f"/proc/{pid}/maps").read_text(errors="replace")
    except OSError:
        return False


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A small tmpfs mounted for the test (a full or read-only file system); unmounted after."""
    need_root()
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "fmnist-faults", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        unavailable(f"cannot mount a tmpfs: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["under-a-file", "read-only-mount"])
def test_unwritable_run_directory(tmp_path, kind):
    need_mpi()
    if kind == "under-a-file":
        (tmp_path / "file").write_text("not a directory\n")
        run_dir, reason, mount = tmp_path / "file" / "run", "Not a directory", contextlib.nullcontext()
    else:
        mount = tmpfs(tmp_path / "ro", "ro,size=1m")
        run_dir, reason = tmp_path / "ro" / "run", "Read-only file system"
    with mount:
        rc, job = run(train(run_dir), tmp_path, f"run-dir-{kind}", run_dir)
    check_fails(rc, job, f"{run_dir}: cannot write the run directory: {reason}")


@pytest.mark.slow
def test_full_disk_while_writing_a_checkpoint(tmp_path):
    """The run directory is a 7 MB tmpfs: the first checkpoint (~5 MB) fits, the second cannot.
    Both ranks stop with one CheckpointError line; the first checkpoint and report are intact."""
    need_mpi()
    with tmpfs(tmp_path / "small", "size=7m") as small:
        run_dir = small / "run"
        rc, job = run(mpirun(train(run_dir, "checkpoint.every_steps=10")), tmp_path, "full-disk-at-checkpoint-2-ranks", run_dir, RUN_TIMEOUT)
        first, second = (run_dir / "checkpoints" / f"examples-{n * 10 * GLOBAL_BATCH:010d}" for n in (1, 2))
        check_fails(rc, job, f"{second}: could not write the checkpoint: No space left on device; "
                             f"the previous checkpoint {first} is intact", reason=NO_SPACE)
        assert checkpoint.list_checkpoints(str(run_dir)) == [str(first)]
        assert checkpoint.verify(str(first))["samples_done"] == 10 * GLOBAL_BATCH
        assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name != first.name], "temporary files left"
        report = load(run_dir)                                # the report of the first checkpoint
        assert report["status"] == "running" and report["segments"][0]["end"] == "running"


@pytest.mark.slow
@pytest.mark.parametrize("flag", [None, "--resume"])
def test_finished_run_directory_is_refused_and_kept(baseline, tmp_path, flag):
    run_dir = tmp_path / "run"
    shutil.copytree(baseline["run_dir"], run_dir)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    cmd = resume(run_dir) if flag == "--resume" else train(run_dir)
    rc, job = run(cmd, tmp_path, "finished-run" + ("-resume" if flag else ""), run_dir)
    check_fails(rc, job, f"--resume {run_dir}: holds a finished run (nothing to resume)" if flag else
                f"{run_dir}: already holds a finished run ({run_dir}/report.json); choose another "
                f"--run-dir, or pass --overwrite to replace it")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("where, message", [
    ("--set train.epoch=3", "--set train.epoch=3: train.epoch: unknown key (did you mean train.epochs?)"),
    ("--set train.batch_size=0",
     "--set train.batch_size=0: train.batch_size: got 0 (int); expected an integer in [1, 60000]"),
    ("file", "{config}: model.layer: unknown key (did you mean model.layers?)"),
], ids=["unknown-key", "out-of-range", "unknown-key-in-file"])
def test_invalid_config_fails_before_any_work(tmp_path, where, message):
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  epochs: 2\nmodel:\n  layer: []\n")
    run_dir = tmp_path / "run"
    cmd = [PYTHON, "-m", "fmnist_dist", "train", "--run-dir", str(run_dir)]
    cmd += ["--config", str(config)] if where == "file" else ["--config", "configs/default.yaml", *where.split()]
    rc, job = run(cmd, tmp_path, "invalid-config", timeout=120)
    assert rc == 2
    check_fails(rc, job, message.format(config=config))
    assert not run_dir.exists()


# ---------------------------------------------------------------------------------------------
# 4. Preempted batch jobs: requeued under a real Slurm cluster, rerun under PBS


def running(proc: subprocess.Popen) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"sbatch --wait ended early ({proc.returncode}): {proc.communicate()}")
    return True


def signal_reached(pid: int, sig: int) -> bool:
    """Whether the signal waits on a stopped process, or someone else has woken it (or it ended)."""
    try:
        fields = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if ":\t" in line)
    except (FileNotFoundError, ProcessLookupError):
        return True
    pending = int(fields["ShdPnd"], 16) | int(fields["SigPnd"], 16)
    return bool(pending >> (sig - 1) & 1) or not fields["State"].startswith("T")


@contextlib.contextmanager
def frozen_until_signalled(run_dir: Path, sig: int, timeout: float = 120):
    """SIGSTOP the ranks of a run, let the caller send `sig` through a launcher chain (batch shell,
    srun or mpirun), and SIGCONT the ranks once it waits on each of them. However slow that chain is
    on a busy machine, the signal then lands mid-training, never after the run's last step."""
    pids = signal_ranks(run_dir, signal.SIGSTOP)
    try:
        yield
        wait_for(lambda: all(signal_reached(pid, sig) for pid in pids), timeout,
                 f"signal {signal.Signals(sig).name} to reach the ranks {pids} of {run_dir}")
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def job_log_line(log: str, prefix: str) -> str:
    return next((line for line in log.splitlines() if line.startswith(prefix)), f"(no line {prefix!r})")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    need("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "srun")
    need_mpi()
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


JOB_ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")     # Slurm job states after the last attempt


def requeued(slurm, job_id: str, log_path: Path) -> bool:
    """Whether the job waits for its second attempt; an AssertionError (with the logs) if it ended
    without a requeue, rather than waiting until Slurm forgets it."""
    job = slurm.job_fields(job_id)
    if job.get("Restarts") == "0" and job["JobState"] in JOB_ENDED:
        log = log_path.read_text() if log_path.exists() else "(no log)"
        raise AssertionError(f"job {job_id} ended {job['JobState']} {job.get('ExitCode')} without a requeue:\n"
                             f"{log[-5000:]}\n{slurm.logs()}")
    return job.get("Restarts") == "1" and job["JobState"] == "PENDING"


@pytest.mark.slow
@pytest.mark.parametrize("how", ["signal", "requeue"])
def test_slurm_job_preempted_requeued_and_finished(slurm, baseline, tmp_path, how):
    """signal: what --signal=B:USR1@120 does before the time limit (scancel --batch --signal=USR1):
    the job script asks the ranks to checkpoint and stop, and requeues the job itself.
    requeue: `scontrol requeue` from outside (SIGTERM to every process of the job); Slurm requeues.
    Either way the same job id runs again in the same run directory and resumes."""
    (ROOT / "runs").mkdir(exist_ok=True)
    env = {"PATH": os.environ.get("PATH") or "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8",
           "SLURM_CONF": str(slurm.conf), "CONFIG": CONFIG,
           "EXTRA": " ".join([*SHORT, f"checkpoint.every_steps={EVERY}"]), **ROOT_MPI_ENV, **LOOPBACK_MPI}
    before = slurm.newest_job(all_states=True)
    sbatch = subprocess.Popen(["sbatch", "--wait", str(ROOT / "jobs" / "train.slurm")], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job_id = run_dir = log_path = None
    try:
        job_id = wait_for(lambda: (j := slurm.newest_job(all_states=True)) != before and j, 60, "the job")
        run_dir, log_path = ROOT / "runs" / job_id, ROOT / "runs" / f"slurm-{job_id}.out"
        wait_for(lambda: running(sbatch) and newest_checkpoint(run_dir) >= 0, RUN_TIMEOUT,
                 f"a checkpoint of job {job_id}")
        if how == "signal":
            with frozen_until_signalled(run_dir, signal.SIGUSR1):
                subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=env, check=True, timeout=60)
        else:
            slurm.scontrol("requeue", job_id)      # SIGCONT + SIGTERM to every process of the job, directly
        wait_for(lambda: requeued(slurm, job_id, log_path), RUN_TIMEOUT, "the requeue")
        # Slurm holds a requeued job for about two minutes (BeginTime), time for the node to clean up
        # the first attempt, which shares the job id (spool directory, batch script). The test skips
        # the hold, but only once that clean-up is done.
        wait_for(lambda: slurm.node_idle() and not slurm.job_processes(job_id), 120,
                 f"node {slurm.node} to clean up the first attempt of job {job_id}")
        slurm.scontrol("update", f"JobId={job_id}", "StartTime=now")
        if how == "signal":
            # A job that requeues itself ends its first attempt with exit 75 before the requeue takes
            # hold, and `sbatch --wait` may return on that attempt (seen: 1); Slurm's record of the
            # job is what counts: wait for the same job id to finish.
            wait_for(lambda: slurm.job_fields(job_id)["JobState"] in JOB_ENDED,
                     RUN_TIMEOUT, f"job {job_id} to finish after its requeue")
            sbatch.wait(timeout=60)
        stdout, stderr = sbatch.communicate(timeout=RUN_TIMEOUT)
    finally:
        if sbatch.poll() is None:
            sbatch.kill()
            if job_id:
                subprocess.run(["scancel", job_id], env=env, timeout=60)
    log = log_path.read_text() if log_path and log_path.exists() else f"(no log)\n{slurm.logs()}"
    job = slurm.job_fields(job_id)
    assert how == "signal" or sbatch.returncode == 0, f"sbatch --wait -> {sbatch.returncode}: {stderr}\n{log[-5000:]}"
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), \
        f"{log[-5000:]}\n{slurm.logs()}"
    assert last_line(log) == f"fmnist-dist: done: report in {run_dir}/report.md", log[-5000:]
    if how == "signal":
        assert "fmnist-dist: warning: the job time limit is near (SIGUSR1 from Slurm)" in log
        assert f"fmnist-dist: preempted: checkpoint in {run_dir}; job {job_id} requeued, it resumes from there" in log
    else:
        assert "fmnist-dist: warning: SIGTERM from Slurm" in log
    assert f"resuming from {run_dir}/checkpoints/examples-" in log        # the log of both runs is kept
    report = load(run_dir)
    check_complete(report, baseline["report"], segments=2)
    first = report["segments"][0]
    # A clean stop within Slurm's KillWait ("preempted"), else killed after it: resumed from the last checkpoint.
    assert first["end"] in (("preempted",) if how == "signal" else ("preempted", "interrupted")), first
    record(f"Slurm job preempted ({'--signal USR1' if how == 'signal' else 'scontrol requeue'}), requeued",
           first_run=first["end"], stopped_at_step=global_step(report["segments"][1]),
           test_accuracy=report["results"]["test_accuracy"], lost_epochs=0, hang=False)
    shutil.rmtree(run_dir)
    log_path.unlink()


@pytest.mark.slow
def test_pbs_job_stopped_by_sigterm_and_rerun(baseline, tmp_path):
    """jobs/train.pbs run as PBS runs it; SIGTERM to the job script's bash (what qdel, preemption
    and the walltime do first): the script asks mpirun to pass SIGUSR1 to the ranks, which
    checkpoint and stop; exit 75 with the command to continue. The rerun (same job id) resumes."""
    need_mpi()
    host = short_host()
    job_id = unique_job_id()
    spool, home = tmp_path / "spool", tmp_path / "home"
    spool.mkdir()
    home.mkdir()
    script = spool / f"{job_id}.SC"
    shutil.copy(ROOT / "jobs" / "train.pbs", script)
    nodefile = write_nodefile(tmp_path / f"aux-{job_id}", [host, host])
    extra = " ".join([*SHORT, f"checkpoint.every_steps={EVERY}"])
    env = pbs_job_env(ROOT, job_id, nodefile, [host, host], HOME=str(home), CONFIG=CONFIG, EXTRA=extra,
                      **LOOPBACK_MPI)
    cmd = ["env", "-i", *(f"{k}={v}" for k, v in env.items()), "bash", str(script)]
    run_dir = ROOT / "runs" / job_id
    try:
        with Job(cmd, tmp_path, "pbs-1", run_dir, env=os.environ, cwd=home) as job:
            wait_for(lambda: job.alive() and newest_checkpoint(run_dir) >= 0, RUN_TIMEOUT, "the first checkpoint")
            with frozen_until_signalled(run_dir, signal.SIGUSR1):
                job.proc.send_signal(signal.SIGTERM)              # env exec'd bash: this is the script
            rc = job.wait(RUN_TIMEOUT)
        log = job.stdout + job.stderr
        assert rc == 75, job.tail()
        assert f"--set train.time_limit={3600 - 120}" in job_log_line(job.stderr, "  launch  ")   # from PBS_WALLTIME
        assert "fmnist-dist: warning: SIGTERM from PBS (qdel, preemption or walltime)" in log
        assert last_line(job.stdout) == (f"fmnist-dist: preempted: checkpoint in {run_dir}; continue with: "
                                         f"qsub -q batch -l nodes=1:ppn=2 -l walltime=01:00:00 -v RUN_DIR={run_dir},"
                                         f"CONFIG={CONFIG},EXTRA=\"{extra}\" jobs/train.pbs")
        assert "stop signal (SIGUSR1)" in load(run_dir)["stopped"]
        assert not processes_of(run_dir)

        with Job(cmd, tmp_path, "pbs-2", run_dir, env=os.environ, cwd=home) as job:   # PBS reruns the job
            rc = job.wait(RUN_TIMEOUT)
        assert rc == 0, job.tail()
        assert last_line(job.stdout) == f"fmnist-dist: done: report in {run_dir}/report.md"
        report = load(run_dir)
        check_complete(report, baseline["report"], segments=2)
        assert [s["end"] for s in report["segments"]] == ["preempted", "completed"]
        record("PBS job script SIGTERM, then rerun", stopped_at_step=global_step(report["segments"][1]),
               test_accuracy=report["results"]["test_accuracy"], lost_epochs=0, hang=False)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
