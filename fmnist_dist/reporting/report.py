"""The run report: aggregation of per-rank timings, report.json / report.md / epochs.csv, summaries.

rank 0 writes report.json after every epoch, at a checkpoint, and at the end; what it holds is
defined once, in schema.py (`Report`).
"""
from __future__ import annotations

import csv
import io
import json
import os
import statistics
from collections.abc import Iterable
from typing import Any

from ..errors import ReportError, ReportWriteError, cause
from ..files import fsync_path, stage, unlink_quietly
from .render import RANK_COLUMNS, render_markdown
from .schema import SCHEMA, SCHEMA_VERSION, Epoch, EpochMetrics, EpochRank, HostTiming, Report, TimingSummary

REPORT_FILES = ("report.json", "report.md", "epochs.csv")


def epoch_summary(epoch: int, rank_records: list[EpochRank], metrics: EpochMetrics) -> Epoch:
    """One epoch from every rank's record; training time is the slowest rank's."""
    training_s = max(r["data_s"] + r["fit_s"] + r["wait_s"] for r in rank_records)
    evaluation_s = max(r["eval_s"] for r in rank_records)
    samples = sum(r["samples"] for r in rank_records)
    return {"epoch": epoch, **metrics, "training_s": training_s, "evaluation_s": evaluation_s,
            "images_per_s": samples / training_s if training_s > 0 else 0.0,
            "ranks": sorted(rank_records, key=lambda r: r["rank"])}


def busy_s(record: EpochRank) -> float:
    """A rank's own working time in an epoch: data input and fit, without the wait for the slowest
    rank and without evaluation."""
    return record["data_s"] + record["fit_s"]


def rank_throughput(records: Iterable[EpochRank]) -> float:
    """One rank's images/s over the records given (one epoch's, or every epoch's): its images over
    its busy seconds; 0.0 when it was never busy. The one definition the report, the plots and
    TensorBoard show."""
    listed = list(records)
    busy = sum(busy_s(r) for r in listed)
    return sum(r["samples"] for r in listed) / busy if busy > 0 else 0.0


def timing_summary(epochs: list[Epoch], target: float | None) -> TimingSummary:
    """Totals over epochs: training time, throughput overall and per rank, imbalance, per host."""
    training_s = sum(e["training_s"] for e in epochs)
    samples = sum(r["samples"] for e in epochs for r in e["ranks"])
    by_rank: dict[int, list[EpochRank]] = {}
    for e in epochs:
        for r in e["ranks"]:
            by_rank.setdefault(r["rank"], []).append(r)
    busy = {rank: sum(busy_s(r) for r in records) for rank, records in by_rank.items()}
    mean_busy = statistics.fmean(busy.values()) if busy else 0.0
    return {
        "training_s": training_s,
        "evaluation_s": sum(e["evaluation_s"] for e in epochs),
        "time_to_target_s": time_to_target(epochs, target),
        "images_per_s": samples / training_s if training_s > 0 else 0.0,
        "images_per_s_per_rank": {str(rank): rank_throughput(by_rank[rank]) for rank in sorted(by_rank)},
        "imbalance": (max(busy.values()) / mean_busy - 1.0) if mean_busy > 0 else 0.0,
        "per_host": _per_host(by_rank),
    }


def time_to_target(epochs: list[Epoch], target: float | None) -> float | None:
    """Training seconds until the first epoch whose validation accuracy reached the target."""
    if target is None:
        return None
    elapsed = 0.0
    for e in epochs:
        elapsed += e["training_s"]
        if e.get("val_accuracy") is not None and e["val_accuracy"] >= target:
            return elapsed
    return None


def _per_host(by_rank: dict[int, list[EpochRank]]) -> dict[str, HostTiming]:
    out: dict[str, HostTiming] = {}
    for rank, records in sorted(by_rank.items()):
        h = out.setdefault(records[-1]["host"], {"ranks": [], "busy_s": 0.0, "samples": 0, "images_per_s": 0.0})
        h["ranks"].append(rank)
        h["busy_s"] = max(h["busy_s"], sum(busy_s(r) for r in records))
        h["samples"] += sum(r["samples"] for r in records)
    for h in out.values():
        h["images_per_s"] = h["samples"] / h["busy_s"] if h["busy_s"] > 0 else 0.0
    return out


def write_report(run_dir: str, report: Report) -> None:
    """report.json, epochs.csv and report.md, each whole or not at all. All three are written to
    temporary files first (a full disk replaces none), then put in place with report.json last: it
    is what a resume and `report` read, so a failure leaves the earlier one. ReportWriteError names
    the file that could not be written."""
    texts = {"report.md": render_markdown(report), "epochs.csv": epochs_csv(report),
             "report.json": json.dumps(report, indent=2, sort_keys=False) + "\n"}
    staged: dict[str, str] = {}
    path = run_dir
    try:
        for name, text in texts.items():
            path = os.path.join(run_dir, name)
            staged[name] = stage(path, text)
        for name in texts:
            path = os.path.join(run_dir, name)
            os.replace(staged[name], path)
            del staged[name]
        path = run_dir
        fsync_path(run_dir)
    except OSError as e:
        raise ReportWriteError(f"{path}: could not write the report: {cause(e)}") from None
    finally:
        for tmp in staged.values():
            unlink_quietly(tmp)


def report_status(run_dir: str) -> str | None:
    """The status of the run directory's report: None when there is none, "unreadable" when it
    cannot be read (a crash mid-write of an older version, a disk error)."""
    try:
        with open(os.path.join(run_dir, "report.json"), encoding="utf-8") as f:
            return json.load(f).get("status", "unknown")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError):
        return "unreadable"


def load_report(run_dir: str) -> Report:
    path = os.path.join(run_dir, "report.json") if os.path.isdir(run_dir) else run_dir
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except FileNotFoundError:
        raise ReportError(f"{path}: no report here (is {run_dir} a run directory?)") from None
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON ({e})") from None
    if report.get("schema") != SCHEMA:
        raise ReportError(f"{path}: not an fmnist-dist report (schema {report.get('schema')!r})")
    if report.get("schema_version") != SCHEMA_VERSION:
        raise ReportError(f"{path}: report schema version {report.get('schema_version')!r}; "
                          f"this fmnist-dist reads version {SCHEMA_VERSION}")
    return report


EPOCH_COLUMNS = ("epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
                 "training_s", "evaluation_s", "images_per_s")
# The split of step_s (fmnist_dist/timing); an empty cell where a rank's record has no value.
SPLIT_COLUMNS = ("compute_s", "comm_s", "comm_method", "other_s", "checkpoint_s")


def epochs_csv(report: Report) -> str:
    """One row per epoch and rank: the epoch's metrics, then that rank's timings."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(EPOCH_COLUMNS + ("rank", "host") + RANK_COLUMNS + SPLIT_COLUMNS)
    for e in report["epochs"]:
        for r in e["ranks"]:
            writer.writerow([_cell(e.get(c)) for c in EPOCH_COLUMNS] + [r["rank"], r["host"]]
                            + [_cell(r.get(c)) for c in RANK_COLUMNS + SPLIT_COLUMNS])
    return out.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


