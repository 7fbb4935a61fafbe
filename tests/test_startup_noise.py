"""A rank's start prints none of TensorFlow's CUDA plugin messages on a CPU-only node (`Unable to
register cuDNN factory`, cuFFT, cuBLAS, `Could not find TensorRT`), and a level the user sets wins."""
from __future__ import annotations

import subprocess

import pytest

from conftest import PYTHON, ROOT, run_env

# A rank's start as `train` does it: the config, environment.prepare, then TensorFlow and Horovod
# (runtime.start). Prints the level TensorFlow loaded with.
RANK_START = """
import os
from fmnist_dist import config, environment
cfg = config.namespace(config.load(None))
environment.prepare(cfg)
from fmnist_dist.training import runtime
runtime.start(cfg)
print("TF_CPP_MIN_LOG_LEVEL=" + os.environ["TF_CPP_MIN_LOG_LEVEL"])
"""
CUDA_PLUGIN_WORDS = ("cuDNN", "cuFFT", "cuBLAS", "TensorRT")


def start_rank(**env: str) -> subprocess.CompletedProcess:
    environ = run_env(**env)
    if "TF_CPP_MIN_LOG_LEVEL" not in env:
        environ.pop("TF_CPP_MIN_LOG_LEVEL")        # run_env quiets TensorFlow: the default is what is tested
    return subprocess.run([PYTHON, "-c", RANK_START], cwd=ROOT, env=environ, capture_output=True, text=True,
                          timeout=300)


def noise(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if any(word in line for word in CUDA_PLUGIN_WORDS)]


@pytest.mark.slow
def test_a_rank_starts_without_cuda_plugin_noise():
    proc = start_rank()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert noise(proc.stderr) == [], proc.stderr[-3000:]


@pytest.mark.slow
def test_the_users_log_level_wins():
    proc = start_rank(TF_CPP_MIN_LOG_LEVEL="0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TF_CPP_MIN_LOG_LEVEL=0" in proc.stdout
    assert noise(proc.stderr), "with level 0 TensorFlow's CUDA plugin lines show (the user asked for everything)"
