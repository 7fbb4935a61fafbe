"""What the tests share: where the project and its Python are, how a test starts a real process,
and how it skips (on a developer machine) or fails (in CI) when a real component is missing.

Tests marked `slow` start real processes (training ranks, launchers, daemons); `make test-fast` runs
the others, `make test` (what CI and the README run) runs everything."""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv"
VENV_BIN = VENV / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Short training: the lean recipe, whose short warm-up and cosine decay end a 100-step run settled
# (the default recipe's one-epoch warm-up leaves such a run at its peak learning rate).
SHORT_CONFIG = "configs/lean.yaml"
SHORT_EXTRA = "train.epochs=1 train.steps_per_epoch=100"
# Open MPI as root refuses to start without these (set only for tests; the job scripts set them
# themselves only when running as root).
ROOT_MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
TIMEOUT = 900


def run_env(**extra: str) -> dict[str, str]:
    """The environment of a process a test starts: this one's, with the project importable, Open MPI
    allowed as root, TensorFlow quiet, and no data directory or timeline inherited by accident."""
    env = dict(os.environ, **ROOT_MPI_ENV, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    env.pop("FMNIST_DATA_DIR", None)
    env.pop("HOROVOD_TIMELINE", None)
    env.update(extra)
    return env


def run(cmd: list[str], timeout: float = TIMEOUT, **env: str) -> subprocess.CompletedProcess:
    """Run cmd from the project directory and capture its output."""
    return subprocess.run(cmd, cwd=ROOT, env=run_env(**env), capture_output=True, text=True, timeout=timeout)


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return run([PYTHON, "-m", "fmnist_dist", *args], timeout=timeout)


def load(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def unavailable(reason: str):
    """Skip on a developer machine without the pieces; in CI the test must run, so fail. Also at a
    module's top level (a whole module skipped, or in CI a collection error that fails the run)."""
    if IN_CI:
        pytest.fail(f"CI={os.environ['CI']} but this test cannot run: {reason} "
                    "(run: bash scripts/setup.sh test as root)")
    pytest.skip(reason, allow_module_level=True)


def require_module(name: str):
    """The imported module `name`, or unavailable(): the CI policy, where pytest.importorskip would
    skip quietly in CI too."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        unavailable(f"cannot import {name} in {sys.executable}: {e} (run: bash scripts/setup.sh test)")


def need(*programs: str, root: bool = True) -> None:
    missing = [p for p in programs if not shutil.which(p, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]
    if missing:
        unavailable(f"missing programs: {' '.join(missing)}")
    if root and os.geteuid() != 0:
        unavailable("needs root (daemons, namespaces)")
    if not (VENV / "bin" / "python").exists():
        unavailable(f"no {VENV} (run: bash scripts/setup.sh test)")


def sbin(name: str) -> str:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or name


def short_host() -> str:
    return socket.gethostname().split(".")[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def stop_pid(proc: subprocess.Popen | None, timeout: float = 20) -> None:
    """SIGTERM the process we started (by its pid), SIGKILL if it does not go."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} missing)"


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# Fault tests pick random interruption points; FMNIST_FAULT_SEED=N repeats a choice.
FAULT_SEED = int(os.environ.get("FMNIST_FAULT_SEED") or random.SystemRandom().randrange(1_000_000))


def record(fault: str, **facts) -> None:
    """One line per handled fault in $FMNIST_FAULT_LOG (JSON lines), for the table in README.md ("Faults and preemption").
    Reached only when every check of the test passed."""
    print(f"{fault}: {facts}")
    if os.environ.get("FMNIST_FAULT_LOG"):
        with open(os.environ["FMNIST_FAULT_LOG"], "a") as f:
            f.write(json.dumps({"fault": fault, "seed": FAULT_SEED, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                **facts}) + "\n")


# Modules whose every test starts real processes; elsewhere a test is slow when it is marked, or
# when it needs the shared real runs.
SLOW_MODULES = {"test_train", "test_faults", "test_jobs", "test_preflight", "test_setup_user",
                "test_faults_input", "test_checkpoints", "test_resume", "test_stall", "test_run_dir",
                "test_simulation"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__ in SLOW_MODULES or "reporting_runs" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


# Two real short runs shared by the report-reading tests (test_compare, test_plots_tensorboard,
# test_projection): 1 rank with 1 thread, and 2 ranks under horovodrun with Horovod's timeline,
# both 2 epochs of 100 steps of 128 images (the projection tests count steps of 128).
REPORTING_SHORT = ["--config", "configs/default.yaml", "--set", "train.epochs=2", "--set", "train.steps_per_epoch=100",
                   "--set", "train.batch_size=128"]


@pytest.fixture(scope="session")
def reporting_runs(tmp_path_factory) -> dict[str, Path]:
    """{'one': 1-rank run dir, 'two': 2-rank run dir}, trained once per session."""
    base = tmp_path_factory.getbasetemp() / "reporting-runs"
    runs = {"one": base / "one-rank", "two": base / "two-ranks"}
    commands = {
        "one": [PYTHON, "-m", "fmnist_dist", "train", *REPORTING_SHORT, "--set", "intel.intra_op_threads=1",
                "--run-dir", str(runs["one"])],
        "two": [str(VENV_BIN / "horovodrun"), "-np", "2", PYTHON, "-m", "fmnist_dist", "train", *REPORTING_SHORT,
                "--set", "report.timeline=true", "--run-dir", str(runs["two"])],
    }
    for name, run_dir in runs.items():
        proc = run(commands[name], timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert load(run_dir)["status"] == "completed"
    return runs
