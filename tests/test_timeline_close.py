"""Closing a whole-run Horovod timeline that fails is said in one warning naming the file and the
error, and the rest of the run's end (the report's breakdown) still happens."""
from __future__ import annotations

import json
import subprocess

import pytest

from conftest import PYTHON, ROOT, run_env

# Rank 0's end of training (Timing.finish) with Horovod's real stop_timeline failing: Horovod is not
# initialized in this process, so it raises ValueError.
FINISH = """
import json, os, types
import horovod.tensorflow.keras as hvd
from fmnist_dist.timing.recorder import Timing
rt = types.SimpleNamespace(hvd=hvd, rank=0, size=2)
timing = Timing(rt, os.environ["RUN_DIR"], {"seconds_per_call": 0.0}, "whole-run", {"0": 1.0, "1": 1.0})
report = {"epochs": []}
timing.finish(report)
print(json.dumps(sorted(report["breakdown"])))
"""


@pytest.mark.slow
def test_a_timeline_that_cannot_be_closed_is_reported_and_the_run_ends(tmp_path):
    timeline = tmp_path / "timeline.json"
    proc = subprocess.run([PYTHON, "-c", FINISH], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=run_env(HOROVOD_TIMELINE=str(timeline), RUN_DIR=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "method" in json.loads(proc.stdout.splitlines()[-1]), proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("fmnist-dist: warning:")]
    assert len(warnings) == 1, proc.stderr[-3000:]
    assert f"cannot close Horovod's timeline {timeline}: Horovod has not been initialized" in warnings[0]
