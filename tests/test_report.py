"""Report aggregation and files: arithmetic on hand-made rank records, atomic writes, schema checks."""
import json
import os

import pytest

from fmnist_dist import files
from fmnist_dist.reporting import report


def rank(r, host="a", data=1.0, fit=9.0, wait=0.0, ev=0.5, samples=1000):
    return {"rank": r, "host": host, "data_s": data, "step_s": fit - 0.5, "fit_s": fit, "wait_s": wait,
            "eval_s": ev, "steps": samples // 100, "samples": samples}


METRICS = {"lr": 1e-3, "train_loss": 0.5, "train_accuracy": 0.8, "val_loss": 0.4, "val_accuracy": 0.85}


def test_epoch_training_time_is_slowest_rank():
    e = report.epoch_summary(1, [rank(1, fit=12.0), rank(0, fit=9.0, wait=3.0)], METRICS)
    assert [r["rank"] for r in e["ranks"]] == [0, 1]
    assert e["training_s"] == pytest.approx(13.0)
    assert e["images_per_s"] == pytest.approx(2000 / 13.0)
    assert e["evaluation_s"] == pytest.approx(0.5)


def test_timing_summary_throughput_imbalance_hosts_target():
    epochs = [report.epoch_summary(1, [rank(0, host="a"), rank(1, host="b", fit=19.0)], dict(METRICS, val_accuracy=0.80)),
              report.epoch_summary(2, [rank(0, host="a"), rank(1, host="b", fit=19.0)], dict(METRICS, val_accuracy=0.91))]
    t = report.timing_summary(epochs, target=0.9)
    assert t["training_s"] == pytest.approx(40.0)
    assert t["images_per_s"] == pytest.approx(4000 / 40.0)
    assert t["images_per_s_per_rank"] == {"0": pytest.approx(100.0), "1": pytest.approx(50.0)}
    # busy 20 s vs 40 s: the slowest is 1/3 above the mean of 30 s
    assert t["imbalance"] == pytest.approx(40 / 30 - 1)
    assert set(t["per_host"]) == {"a", "b"} and t["per_host"]["b"]["ranks"] == [1]
    assert t["time_to_target_s"] == pytest.approx(40.0)
    assert report.timing_summary(epochs, target=0.95)["time_to_target_s"] is None
    assert report.timing_summary(epochs, target=None)["time_to_target_s"] is None


def test_atomic_write_leaves_no_temp_and_keeps_old_on_failure(tmp_path):
    path = tmp_path / "x.json"
    files.atomic_write(str(path), "one")
    assert path.read_text() == "one"

    with pytest.raises(TypeError):
        files.atomic_write(str(path), 123)  # write() of a non-string fails midway
    assert path.read_text() == "one"
    assert os.listdir(tmp_path) == ["x.json"]


def test_load_report_errors(tmp_path):
    with pytest.raises(report.ReportError, match="no report here"):
        report.load_report(str(tmp_path))
    (tmp_path / "report.json").write_text("{")
    with pytest.raises(report.ReportError, match="not valid JSON"):
        report.load_report(str(tmp_path))
    (tmp_path / "report.json").write_text(json.dumps({"schema": report.SCHEMA, "schema_version": 99}))
    with pytest.raises(report.ReportError, match="schema version 99"):
        report.load_report(str(tmp_path))
    (tmp_path / "report.json").write_text(json.dumps({"schema": "other"}))
    with pytest.raises(report.ReportError, match="not an fmnist-dist report"):
        report.load_report(str(tmp_path))


@pytest.mark.parametrize("flags", [("--seeds", "--project"), ("--scan", "--plots", "/tmp/p"), ("--seeds", "--scan"),
                                   ("--scan", "--project")])
def test_report_refuses_options_that_would_be_ignored(tmp_path, flags):
    from conftest import cli

    proc = cli("report", str(tmp_path / "a"), str(tmp_path / "b"), *flags)
    assert proc.returncode == 2, proc.stderr
    assert "do not go together" in proc.stderr or "two different tables" in proc.stderr, proc.stderr
