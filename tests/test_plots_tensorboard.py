"""The run directory holds PNG plots (valid, of the documented size) and TensorBoard event files
with the scalars; `report --plots` draws them again and the comparison's scaling plot; a rank's
images/s is one number in the report, the plot and TensorBoard."""
from __future__ import annotations

import math
import struct
from pathlib import Path

import pytest

from fmnist_dist.reporting import plots, report as report_mod
from conftest import cli, load, require_module


@pytest.fixture(scope="module")
def runs(reporting_runs):
    return reporting_runs


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR" and data[-8:-4] == b"IEND", f"{path} is not a complete PNG"
    return struct.unpack(">II", data[16:24])


def test_run_directory_has_the_plots(runs):
    for run in runs.values():
        for name in plots.RUN_PLOTS:
            path = run / name
            assert png_size(path) == plots.PIXELS == (800, 450)
            assert 10_000 < path.stat().st_size < 200_000


def test_report_draws_comparison_and_run_plots(runs, tmp_path):
    out = tmp_path / "cmp"
    proc = cli("report", str(runs["one"]), str(runs["two"]), "--plots", str(out), "--project")
    assert proc.returncode == 0, proc.stderr
    for name in plots.COMPARISON_PLOTS:
        assert png_size(out / name) == plots.PIXELS
    assert "plots: " in proc.stderr
    single = tmp_path / "single"
    proc = cli("report", str(runs["two"]), "--plots", str(single))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in single.iterdir()) == sorted(plots.RUN_PLOTS)


def test_tensorboard_event_files_hold_the_scalars(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    report = load(runs["two"])
    files = list((runs["two"] / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    acc = EventAccumulator(str(runs["two"] / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["tensors"])
    expected = {"loss/train", "loss/validation", "accuracy/train", "accuracy/validation", "learning_rate",
                "throughput/images_per_s", "time/epoch_training_s", "loss/test", "accuracy/test",
                "throughput/rank0_images_per_s", "throughput/rank1_images_per_s"}
    assert expected <= tags, expected - tags

    def series(tag):
        return {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}

    epochs = report["epochs"]
    assert series("loss/train") == {e["epoch"]: pytest.approx(e["train_loss"], rel=1e-5) for e in epochs}
    assert series("accuracy/validation") == {e["epoch"]: pytest.approx(e["val_accuracy"], rel=1e-5) for e in epochs}
    assert series("learning_rate") == {e["epoch"]: pytest.approx(e["lr"], rel=1e-5) for e in epochs}
    assert series("time/epoch_training_s") == {e["epoch"]: pytest.approx(e["training_s"], rel=1e-5) for e in epochs}
    assert series("accuracy/test") == {2: pytest.approx(report["results"]["test_accuracy"], rel=1e-5)}


def test_a_ranks_images_per_s_is_one_number_in_report_plot_and_tensorboard():
    """report.json's per-rank images/s, throughput.png's per-rank lines and TensorBoard's per-rank
    scalars all come from report.rank_throughput: images over data + fit seconds, 0 for a rank that
    trained none of the epoch (rank 1 in epoch 1, as after a resume), a gap in the plot for an epoch
    without the rank's record (rank 2 in epoch 1)."""
    require_module("tensorflow")
    from fmnist_dist.reporting.tensorboard import epoch_scalars

    def record(rank, data, fit, samples):
        return {"rank": rank, "host": "a", "data_s": data, "step_s": fit, "fit_s": fit, "wait_s": 5.0,
                "eval_s": 1.0, "steps": samples // 100, "samples": samples}

    metrics = {"lr": 1e-3, "train_loss": 0.5, "train_accuracy": 0.8, "val_loss": 0.4, "val_accuracy": 0.85}
    epochs = [report_mod.epoch_summary(1, [record(0, 1.0, 9.0, 1000), record(1, 0.0, 0.0, 0)], metrics),
              report_mod.epoch_summary(2, [record(0, 1.0, 4.0, 1000), record(1, 1.0, 19.0, 1000),
                                       record(2, 0.5, 4.5, 500)], metrics)]
    by_hand = {0: [100.0, 200.0], 1: [0.0, 50.0], 2: [math.nan, 100.0]}
    series = plots.rank_series(epochs)
    assert series.keys() == by_hand.keys()
    for rank, expected in by_hand.items():
        assert series[rank] == pytest.approx(expected, nan_ok=True), rank
    for i, e in enumerate(epochs):
        scalars = epoch_scalars(e)
        shown = {r["rank"]: scalars[f"throughput/rank{r['rank']}_images_per_s"] for r in e["ranks"]}
        assert shown == {rank: pytest.approx(by_hand[rank][i]) for rank in shown}, e["epoch"]
    totals = report_mod.timing_summary(epochs, None)["images_per_s_per_rank"]
    assert totals == {"0": pytest.approx(2000 / 15), "1": pytest.approx(50.0), "2": pytest.approx(100.0)}
