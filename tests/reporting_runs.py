"""Two real short runs shared by the report-reading tests (test_compare, test_plots_tensorboard,
test_projection): 1 rank with 1 thread, and 2 ranks under horovodrun with Horovod's timeline, both
2 epochs of 100 steps. Made once per pytest session (the first test module to ask makes them)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
SHORT = ["--config", "configs/default.yaml", "--set", "train.epochs=2", "--set", "train.steps_per_epoch=100",
         "--set", "train.batch_size=128"]   # the projection tests count steps of 128
TIMEOUT = 600


def run_env() -> dict:
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    env.pop("HOROVOD_TIMELINE", None)
    return env


def run(cmd: list[str], timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=timeout)


def cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return run([PYTHON, "-m", "fmnist_dist", *args], timeout=timeout)


def load(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def real_runs(tmp_path_factory) -> dict[str, Path]:
    """{'one': 1-rank run dir, 'two': 2-rank run dir}, trained on first use in this session."""
    base = tmp_path_factory.getbasetemp() / "reporting-runs"
    runs = {"one": base / "one-rank", "two": base / "two-ranks"}
    commands = {
        "one": [PYTHON, "-m", "fmnist_dist", "train", *SHORT, "--set", "intel.intra_op_threads=1",
                "--run-dir", str(runs["one"])],
        "two": [str(VENV_BIN / "horovodrun"), "-np", "2", PYTHON, "-m", "fmnist_dist", "train", *SHORT,
                "--set", "report.timeline=true", "--run-dir", str(runs["two"])],
    }
    for name, run_dir in runs.items():
        if (run_dir / "report.json").exists() and load(run_dir)["status"] == "completed":
            continue
        proc = run(commands[name])
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert load(run_dir)["status"] == "completed"
    return runs
