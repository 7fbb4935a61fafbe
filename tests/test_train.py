"""Real training runs on the real data: horovodrun and mpirun with 2 ranks, a single process, and
the runs that must fail cleanly (bad config, missing data). Short: a few hundred steps."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from conftest import PYTHON, SHORT_CONFIG, VENV_BIN, load, run
from fmnist_dist import data

# The lean recipe, whose schedule suits a short run (conftest.SHORT_CONFIG), 2 epochs of 100 steps.
SHORT = ["--config", SHORT_CONFIG, "--set", "train.epochs=2", "--set", "train.steps_per_epoch=100"]


def train_cmd(run_dir: Path, *extra: str) -> list[str]:
    return [PYTHON, "-m", "fmnist_dist", "train", "--run-dir", str(run_dir), *SHORT, *extra]


def check_report(report: dict, ranks: int) -> None:
    assert report["status"] == "completed"
    world = report["world"]
    assert world["size"] == ranks and [r["rank"] for r in world["ranks"]] == list(range(ranks))
    assert len({r["initial_weights_sha256"] for r in world["ranks"]}) == 1, "ranks started from different weights"
    check_shards_disjoint(report)
    assert len(report["epochs"]) == 2
    for epoch in report["epochs"]:
        assert len(epoch["ranks"]) == ranks
        for r in epoch["ranks"]:
            assert r["steps"] == 100 and r["samples"] == 100 * report["data"]["batch_size_per_rank"]
            assert 0 < r["step_s"] <= r["fit_s"] <= epoch["training_s"] + 1e-6
            assert r["wait_s"] >= 0 and r["data_s"] >= 0 and r["eval_s"] > 0
    t = report["timing"]
    assert t["training_s"] == pytest.approx(sum(e["training_s"] for e in report["epochs"]))
    samples = sum(r["samples"] for e in report["epochs"] for r in e["ranks"])
    assert t["images_per_s"] == pytest.approx(samples / t["training_s"])
    assert t["startup_s"] > 0 and t["data_load_s"] > 0 and t["total_s"] > t["training_s"]
    res = report["results"]
    assert res["test_total"] == 10000 and res["test_accuracy"] == res["test_correct"] / 10000
    assert res["test_accuracy"] > 0.75, "well above chance (10%) after 200 steps"
    assert res["test_accuracy_one_view"] > 0.75
    if not res["eval_flip"]:
        assert res["test_accuracy_one_view"] == res["test_accuracy"]
    assert report["data"]["val_size"] == 5000 and report["data"]["train_size"] == 55000


def check_shards_disjoint(report: dict) -> None:
    """Re-derive every rank's epoch-1 shard, check it is the one the rank trained on, and disjoint."""
    cfg, d, world = report["config"], report["data"], report["world"]
    train_idx, _ = data.split_train_val(60000, cfg["data"]["val_size"], cfg["train"]["seed"])
    shards = []
    for r in world["ranks"]:
        shard = data.epoch_shard(train_idx, 1, cfg["train"]["seed"], r["rank"], world["size"],
                                 d["batch_size_per_rank"])[: r["shard_size"]]
        assert data.index_digest(shard) == r["epoch1_shard_sha256"]
        shards.append(set(shard.tolist()))
    assert sum(len(s) for s in shards) == len(set().union(*shards)), "rank shards overlap"


@pytest.fixture(scope="module")
def horovodrun_report(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("hvd") / "run"
    proc = run([str(VENV_BIN / "horovodrun"), "-np", "2", *train_cmd(run_dir)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "test accuracy" in proc.stdout
    return run_dir


def test_horovodrun_two_ranks(horovodrun_report):
    report = load(horovodrun_report)
    check_report(report, ranks=2)
    assert report["environment"]["intra_op_threads"] == max(1, os.cpu_count() // 2)
    for name in ("report.md", "epochs.csv", "config.yaml"):
        assert (horovodrun_report / name).stat().st_size > 0
    assert len((horovodrun_report / "epochs.csv").read_text().splitlines()) == 1 + 2 * 2


def test_report_command_prints_the_run_again(horovodrun_report):
    proc = run([PYTHON, "-m", "fmnist_dist", "report", str(horovodrun_report)], timeout=60)
    assert proc.returncode == 0, proc.stderr
    acc = load(horovodrun_report)["results"]["test_accuracy"]
    assert f"test accuracy {100 * acc:.2f}%" in proc.stdout and "ranks 2" in proc.stdout


def test_finished_run_dir_is_refused_and_kept(horovodrun_report):
    before = (horovodrun_report / "report.json").read_bytes()
    proc = run(train_cmd(horovodrun_report))
    assert proc.returncode == 2
    assert f"{horovodrun_report}: already holds a finished run" in proc.stderr
    assert (horovodrun_report / "report.json").read_bytes() == before


def test_mpirun_two_ranks(tmp_path):
    run_dir = tmp_path / "run"
    proc = run(["mpirun", "-np", "2", "--bind-to", "none", *train_cmd(run_dir, "--set", "train.eval_flip=false")])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_report(load(run_dir), ranks=2)


def test_single_process(tmp_path):
    """One process, no launcher; trained with flips and shifts and evaluated on each image and its
    mirror image, each at every offset of one pixel (train.eval_flip, train.eval_shift: 18 views)."""
    run_dir = tmp_path / "run"
    proc = run(train_cmd(run_dir, "--set", "train.augment_flip=true", "--set", "train.eval_flip=true",
                         "--set", "train.augment_shift=1", "--set", "train.eval_shift=1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = load(run_dir)
    check_report(report, ranks=1)
    res = report["results"]
    assert res["eval_flip"] is True and res["eval_shift"] == 1
    assert ("each image and its mirror image (train.eval_flip), each moved by up to 1 pixel(s) (train.eval_shift); "
            f"the images alone: test accuracy {100 * res['test_accuracy_one_view']:.2f}%" in proc.stdout)
    assert report["environment"]["intra_op_threads"] == len(os.sched_getaffinity(0))


def test_bad_config_key_fails_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    proc = run(train_cmd(run_dir, "--set", "train.epoch=3"), timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "fmnist-dist: error: --set train.epoch=3: train.epoch: unknown key (did you mean train.epochs?)")
    assert not run_dir.exists()


def test_missing_data_on_two_ranks_fails_cleanly(tmp_path):
    empty, run_dir = tmp_path / "empty", tmp_path / "run"
    empty.mkdir()
    proc = run(["mpirun", "-np", "2", *train_cmd(run_dir, "--data-dir", str(empty))], timeout=300)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if "fmnist-dist: error:" in ln]
    # Checked on each node before the ranks meet: each rank that got to it says so, naming its host.
    assert 1 <= len(lines) <= 2 and all(f"{socket.gethostname()}: " in ln and str(empty) in ln for ln in lines), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "report.json").exists()
