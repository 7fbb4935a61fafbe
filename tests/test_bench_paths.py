"""The benchmark and the race from outside the checkout: paths as the caller meant them, and a
missing launcher said in one line, not a traceback."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import PYTHON, ROOT, run_env
from fmnist_dist.bench.run import run_logged


def test_a_missing_launcher_is_one_line_in_the_log_and_the_result(tmp_path):
    log = tmp_path / "launch.log"
    error = run_logged([str(tmp_path / "no-such-horovodrun"), "-np", "2"], str(log), 10)
    assert error.startswith(f"cannot start {tmp_path / 'no-such-horovodrun'}") and "No such file" in error
    assert "cannot start" in log.read_text()


@pytest.mark.slow
def test_bench_from_another_directory_with_relative_paths(tmp_path):
    config = os.path.relpath(ROOT / "configs" / "lean.yaml", tmp_path)
    proc = subprocess.run([PYTHON, "-m", "fmnist_dist", "bench", "--quick", "--variants", "keras-1x2-fp32",
                           "--no-peak", "--config", config, "--out", "out"], cwd=tmp_path,
                          env=run_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    bench = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert bench["variants"][0]["median"] > 0
