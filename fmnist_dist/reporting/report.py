"""The run report: aggregation of per-rank timings, report.json / report.md / epochs.csv, summaries.

report.json schema (SCHEMA_VERSION 1), written by rank 0 after every epoch and at the end:
  schema, schema_version, run_id, status (running|completed|failed|preempted), error,
  failure {reason, epoch, step (of the epoch), run_step, loss, rank} (when the training loss became
          NaN or infinite: where it was first seen),
  started, finished, command, config (fully resolved),
  environment (detected at run time: versions, ITEX/oneDNN/bf16 state, CPU flags, threads;
               precision {requested, chosen, reason, hosts {host: isa}}; nodes [each rank's CPU:
               host, cpu_model, flags, isa, isa_cap, avx512, native_bf16]),
  preflight (RUN_DIR/preflight.json when the job ran one: ranks, clock_offsets_s, clock_skew_s,
             precision, problems) or null,
  world {size, hosts {host: [ranks]}, ranks [{rank, host, local_rank, pid, threads,
         shard_size, epoch1_shard_sha256 (of the rank's epoch-1 training indices as int64),
         initial_weights_sha256}]},
  segments [{segment, started, world_size, hosts, resumed_from, start_epoch, start_position, peak_lr,
             precision, training_s, ended, end (running|completed|preempted|failed|interrupted), note,
             reason, code_version (fmnist-dist version [+g<git commit>] that ran the segment),
             checkpoint_code_version (on a resume: the version that wrote its checkpoint)}]
             (one per start or resume of the run),
  data {source, train_size, val_size, test_size, steps_per_epoch, batch_size_per_rank (of one rank,
        real or simulated), global_batch_size, scaling {mode (weak|strong), processes, world_size,
        simulated, global_batch_size, batch_size_per_rank, batch_size_per_process, lr_factor,
        recipe (standard|large-batch), optimizer, warmup_epochs, accuracy_basis}},
  model {layers, description, parameters, trainable_parameters, batch_norm, flops_per_image},
  epochs [{epoch, lr, train_loss, train_accuracy, val_loss, val_accuracy, training_s,
           evaluation_s, images_per_s, ranks [{rank, host, data_s, step_s, fit_s, wait_s,
           eval_s, steps, samples,
           compute_s, comm_s, comm_method (probe|timeline|single), tracing_s, other_s
           (fit_s - step_s + tracing_s), step_median_s, step_spread, cpu_s, cpu_wait_s,
           cpu_wait_share, loadavg, checkpoint_s,
           negotiate_s (timeline only); compute_s + comm_s + tracing_s = step_s}]}],
  timing {startup_s, data_load_s, training_s, evaluation_s, total_s, time_to_target_s,
          images_per_s, images_per_s_per_rank {rank: x}, imbalance, per_host {host: {...}}},
  results {val_accuracy, val_loss, test_accuracy, test_loss, test_correct, test_total,
           eval_flip (validation and test logits averaged over each image and its mirror image),
           test_accuracy_one_view (the test images alone; equals test_accuracy without eval_flip),
           target_accuracy, target_reached_epoch},
  breakdown {method (probe|timeline|single|mixed), method_detail,
           timeline {mode (per-epoch|whole-run), files} or null, categories [...],
           probe {tensors, gradient_bytes, calls, warmup, ranks, seconds_per_call,
                  seconds_per_call_ranks {rank: s}, spread (interquartile range / median),
                  sizes [{bytes, seconds}], fit {latency_s, bandwidth_Bps, r2, model} or null,
                  probe_s, skipped (1 rank only)},
           ranks [{rank, host, startup_s, data_s, compute_s, comm_s, wait_s, other_s, eval_s,
                   checkpoint_s, total_s, steps, samples}] (totals over epochs; see fmnist_dist/timing)}
All times are seconds of wall-clock time; "training" excludes evaluation and start-up.
"""
from __future__ import annotations

import csv
import io
import json
import os
import statistics
from typing import Any
from ..errors import ReportError, ReportWriteError, cause
from ..files import fsync_path, stage, unlink_quietly
from .render import RANK_COLUMNS, render_markdown

SCHEMA = "fmnist-dist/report"
SCHEMA_VERSION = 1
REPORT_FILES = ("report.json", "report.md", "epochs.csv")



def epoch_summary(epoch: int, rank_records: list[dict], metrics: dict) -> dict:
    """One epoch from every rank's record; training time is the slowest rank's."""
    training_s = max(r["data_s"] + r["fit_s"] + r["wait_s"] for r in rank_records)
    evaluation_s = max(r["eval_s"] for r in rank_records)
    samples = sum(r["samples"] for r in rank_records)
    return {"epoch": epoch, **metrics, "training_s": training_s, "evaluation_s": evaluation_s,
            "images_per_s": samples / training_s if training_s > 0 else 0.0,
            "ranks": sorted(rank_records, key=lambda r: r["rank"])}


def timing_summary(epochs: list[dict], target: float | None) -> dict:
    """Totals over epochs: training time, throughput overall and per rank, imbalance, per host."""
    training_s = sum(e["training_s"] for e in epochs)
    samples = sum(r["samples"] for e in epochs for r in e["ranks"])
    busy: dict[int, float] = {}
    rank_samples: dict[int, int] = {}
    hosts: dict[int, str] = {}
    for e in epochs:
        for r in e["ranks"]:
            busy[r["rank"]] = busy.get(r["rank"], 0.0) + r["data_s"] + r["fit_s"]
            rank_samples[r["rank"]] = rank_samples.get(r["rank"], 0) + r["samples"]
            hosts[r["rank"]] = r["host"]
    per_rank = {str(k): rank_samples[k] / busy[k] if busy[k] > 0 else 0.0 for k in sorted(busy)}
    mean_busy = statistics.fmean(busy.values()) if busy else 0.0
    return {
        "training_s": training_s,
        "evaluation_s": sum(e["evaluation_s"] for e in epochs),
        "time_to_target_s": time_to_target(epochs, target),
        "images_per_s": samples / training_s if training_s > 0 else 0.0,
        "images_per_s_per_rank": per_rank,
        "imbalance": (max(busy.values()) / mean_busy - 1.0) if mean_busy > 0 else 0.0,
        "per_host": _per_host(busy, rank_samples, hosts),
    }


def time_to_target(epochs: list[dict], target: float | None) -> float | None:
    """Training seconds until the first epoch whose validation accuracy reached the target."""
    if target is None:
        return None
    elapsed = 0.0
    for e in epochs:
        elapsed += e["training_s"]
        if e.get("val_accuracy") is not None and e["val_accuracy"] >= target:
            return elapsed
    return None


def _per_host(busy: dict, samples: dict, hosts: dict) -> dict:
    out: dict[str, dict] = {}
    for rank, host in sorted(hosts.items()):
        h = out.setdefault(host, {"ranks": [], "busy_s": 0.0, "samples": 0})
        h["ranks"].append(rank)
        h["busy_s"] = max(h["busy_s"], busy[rank])
        h["samples"] += samples[rank]
    for h in out.values():
        h["images_per_s"] = h["samples"] / h["busy_s"] if h["busy_s"] > 0 else 0.0
    return out


def write_report(run_dir: str, report: dict) -> None:
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


def load_report(run_dir: str) -> dict:
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


def epochs_csv(report: dict) -> str:
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


