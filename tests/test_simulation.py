"""Simulated ranks (train.simulate_world_size) against real ones: the same training, step for step.

Without dropout, flips or bf16, a run of W ranks and a run simulating them on fewer processes take
the same examples in the same batch-norm groups from the same weights with the same learning rate,
so their training losses agree to rounding. The control: batch norm over another group size
differs by far more. Short real runs: 4 epochs of 8 steps, global batch 512.
"""
from __future__ import annotations


import os

import pytest

from conftest import PYTHON, VENV_BIN, load, run
from fmnist_dist.environment import thread_layout

# The lean network without dropout (its masks are drawn per rank), fp32, no flips.
NETWORK = """
model:
  layers:
    - {type: conv, filters: 32, kernel: 3}
    - {type: batchnorm}
    - {type: relu}
    - {type: maxpool, size: 2}
    - {type: conv, filters: 64, kernel: 3}
    - {type: batchnorm}
    - {type: relu}
    - {type: maxpool, size: 2}
    - {type: flatten}
    - {type: dense, units: 128}
    - {type: relu}
train:
  epochs: 4
  steps_per_epoch: 8
  lr: 0.001
  warmup_epochs: 0.3
  augment_flip: false
  eval_flip: false
  label_smoothing: 0.0
intel:
  mixed_precision: fp32
report:
  plots: false
  tensorboard: false
"""
AGREE = 0.008      # relative, per epoch: fp32 rounding in another summation order (measured up to 0.0033)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    base = tmp_path_factory.mktemp("simulation")
    config = base / "network.yaml"
    config.write_text(NETWORK)

    def train(name: str, processes: int, *sets: str) -> dict:
        launcher = [str(VENV_BIN / "horovodrun"), "--gloo", "-np", str(processes)] if processes > 1 else []
        cmd = [*launcher, PYTHON, "-m", "fmnist_dist", "train", "--config", str(config),
               "--run-dir", str(base / name), *[a for s in sets for a in ("--set", s)]]
        proc = run(cmd, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return load(base / name)

    return {
        "real 2": train("real2", 2),                                              # 256 per rank
        "2 on 1": train("sim2on1", 1, "train.simulate_world_size=2"),
        "4 on 2": train("sim4on2", 2, "train.simulate_world_size=4", "train.global_batch_size=512"),
        "4 on 1": train("sim4on1", 1, "train.simulate_world_size=4", "train.global_batch_size=512"),
    }


def losses(report: dict) -> list[float]:
    return [e["train_loss"] for e in report["epochs"]]


def worst_gap(a: dict, b: dict) -> float:
    return max(abs(x - y) / y for x, y in zip(losses(a), losses(b)))


def test_simulated_ranks_train_as_the_real_ones(runs):
    real, simulated = runs["real 2"], runs["2 on 1"]
    assert simulated["data"]["scaling"]["choice"]["mode"] == "weak"     # this short recipe has no basis
    assert {k: v for k, v in simulated["data"]["scaling"].items() if k not in ("accuracy_basis", "choice")} == {
        "mode": "weak", "processes": 1, "world_size": 2, "simulated": True, "global_batch_size": 512,
        "batch_size_per_rank": 256, "batch_size_per_process": 512, "lr_factor": 2.0,
        "recipe": "standard", "optimizer": "adam", "warmup_epochs": 0.3}
    assert real["data"]["scaling"]["simulated"] is False
    assert simulated["segments"][0]["peak_lr"] == real["segments"][0]["peak_lr"] == pytest.approx(0.002)
    assert worst_gap(simulated, real) < AGREE, (losses(simulated), losses(real))


def test_a_process_runs_its_simulated_ranks_side_by_side(runs):
    """intel.inter_op_threads=0 (auto): a process of several threads carrying several simulated ranks
    runs their towers side by side, one thread inside each op, and ITEX's OpenMP with one thread;
    a process of one rank's batch keeps all its threads inside each op."""
    cores = len(os.sched_getaffinity(0))
    for name, processes, towers in (("2 on 1", 1, 2), ("4 on 1", 1, 4), ("4 on 2", 2, 2), ("real 2", 2, 1)):
        env = runs[name]["environment"]
        threads = max(1, cores // processes)
        layout = thread_layout(threads, towers, 0, 0)
        if cores == 2:                         # this machine's case, spelled out
            assert layout == ((1, 2) if processes == 1 else (1, 1))
        in_effect = (env["intra_op_threads"], env["inter_op_threads"], env["omp_num_threads"])
        assert in_effect == (*layout, str(layout[0])), name


def test_the_split_over_processes_does_not_matter(runs):
    """Strong scaling: 4 ranks of 128 simulated on 2 processes or on 1 train alike."""
    on_two, on_one = runs["4 on 2"], runs["4 on 1"]
    for report, processes in ((on_two, 2), (on_one, 1)):
        s = report["data"]["scaling"]
        assert (s["mode"], s["processes"], s["world_size"], s["batch_size_per_rank"]) == ("strong", processes, 4, 128)
        assert s["lr_factor"] == 2.0                      # 512 / train.batch_size (256), whatever the ranks
    assert worst_gap(on_two, on_one) < AGREE, (losses(on_two), losses(on_one))
    # The control, what the tolerance must be able to tell apart: batch norm over 128 instead of 256
    # (measured 1.9%); one process at batch 512 without simulation differed by 6.9%.
    assert worst_gap(on_one, runs["2 on 1"]) > AGREE



def test_a_recipe_without_a_basis_is_told_so_and_not_warned_from_another(runs):
    basis = runs["real 2"]["data"]["scaling"]["accuracy_basis"]
    assert basis["basis"] is None and basis["warning"] is None and basis["expected_accuracy"] is None
    assert "no accuracy basis was measured for this recipe" in basis["note"]
    assert "no accuracy basis" in runs["real 2"]["data"]["scaling"]["choice"]["reason"]
