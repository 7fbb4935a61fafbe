"""The run report: aggregation of per-rank timings, report.json / report.md / epochs.csv, summaries.

report.json schema (SCHEMA_VERSION 1), written by rank 0 after every epoch and at the end:
  schema, schema_version, run_id, status (running|completed|failed|preempted), error,
  started, finished, command, config (fully resolved),
  environment (detected at run time: versions, ITEX/oneDNN/bf16 state, CPU flags, threads),
  world {size, hosts {host: [ranks]}, ranks [{rank, host, local_rank, pid, threads,
         shard_size, epoch1_shard_sha256 (of the rank's epoch-1 training indices as int64),
         initial_weights_sha256}]},
  data {source, train_size, val_size, test_size, steps_per_epoch, batch_size_per_rank,
        global_batch_size},
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
  breakdown (added in place, schema still 1; absent in older reports — readers fall back to
           the per-epoch fields) {method (probe|timeline|single|mixed), method_detail,
           timeline {mode (per-epoch|whole-run), files} or null, categories [...],
           probe {tensors, gradient_bytes, calls, warmup, ranks, seconds_per_call,
                  seconds_per_call_ranks {rank: s}, spread (interquartile range / median),
                  sizes [{bytes, seconds}], fit {latency_s, bandwidth_Bps, r2, model} or null,
                  probe_s, skipped (1 rank only)},
           ranks [{rank, host, startup_s, data_s, compute_s, comm_s, wait_s, other_s, eval_s,
                   checkpoint_s, total_s, steps, samples}] (totals over epochs; see timing.py)}
All times are seconds of wall-clock time; "training" excludes evaluation and start-up.
"""
from __future__ import annotations

import csv
import io
import json
import os
import statistics
from typing import Any
from .errors import FmnistError
from .files import atomic_write

SCHEMA = "fmnist-dist/report"
SCHEMA_VERSION = 1
REPORT_FILES = ("report.json", "report.md", "epochs.csv")


class ReportError(FmnistError):
    """A report that cannot be read: missing, corrupt or of an unknown schema."""


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
    atomic_write(os.path.join(run_dir, "report.json"), json.dumps(report, indent=2, sort_keys=False) + "\n")
    atomic_write(os.path.join(run_dir, "epochs.csv"), epochs_csv(report))
    atomic_write(os.path.join(run_dir, "report.md"), render_markdown(report))


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
RANK_COLUMNS = ("data_s", "step_s", "fit_s", "wait_s", "eval_s", "samples")
# The split of step_s (timing.py); empty cells for reports written before it existed.
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


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def _secs(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f} s"


def summary_lines(report: dict) -> list[str]:
    """The short end-of-run summary printed by rank 0 and by `report RUN_DIR`."""
    t, res, w, env = report["timing"], report.get("results", {}), report["world"], report["environment"]
    hosts = len(w["hosts"])
    prec = precision_label(env)
    lines = [
        f"fmnist-dist run {report['run_id']}: {report['status']}" + (f" ({report['error']})" if report.get("error") else ""),
        f"  ranks {w['size']} on {hosts} host{'s' if hosts != 1 else ''} · {env.get('intra_op_threads')} threads/rank"
        f" · epochs {len(report['epochs'])} · batch {report['data']['batch_size_per_rank']}/rank · {prec}"
        f" · ITEX {'on' if env.get('itex', {}).get('loaded') else 'off'} · oneDNN {'on' if env.get('onednn_enabled') else 'off'}",
        f"  training time {_secs(t.get('training_s'))} · {t.get('images_per_s', 0):.0f} images/s"
        f" · test accuracy {_pct(res.get('test_accuracy'))}"
        + (f" ({res['test_correct']}/{res['test_total']})" if res.get("test_total") else "")
        + f" · validation {_pct(res.get('val_accuracy'))}",
    ]
    if res.get("eval_flip"):
        lines.append(f"  evaluated on each image and its mirror image (train.eval_flip); the images alone: "
                     f"test accuracy {_pct(res.get('test_accuracy_one_view'))}")
    if res.get("target_accuracy") is not None:
        lines.append(f"  target {_pct(res['target_accuracy'])}: "
                     + (f"reached in {_secs(t['time_to_target_s'])} (epoch {res['target_reached_epoch']})"
                        if t.get("time_to_target_s") is not None else "not reached"))
    decision = (report.get("environment") or {}).get("precision")
    if decision:
        lines.append(f"  precision: {decision['reason']}")
    from .timing import share_line  # where the time went, in one line
    share = share_line(report)
    if share:
        lines.append(share)
    return lines


def precision_label(env: dict) -> str:
    """The precision the kernels really ran in (from the state TensorFlow and ITEX were in)."""
    if env.get("itex_auto_mixed_precision"):
        return "bf16 (ITEX AMP)"
    policy = env.get("mixed_precision_policy") or "float32"
    return "bf16 (Keras)" if "bfloat16" in policy else policy


def precision_lines(report: dict) -> list[str]:
    """Why this precision: the decision and each host's CPU as the decision saw it."""
    env = report.get("environment") or {}
    decision = env.get("precision")
    if not decision:
        return []
    lines = [f"precision {precision_label(env)}: {decision['reason']} (intel.mixed_precision={decision['requested']})"]
    seen = set()
    for node in env.get("nodes") or []:
        if node["host"] not in seen:
            seen.add(node["host"])
            cap = f", {node['isa_cap']}" if node.get("isa_cap") else ""
            lines.append(f"  {node['host']}: {node['cpu_model']}, {node['isa']}{cap} "
                         f"(flags {' '.join(node['flags']) or 'none of note'})")
    return lines


def _section(title: str, lines: list[str]) -> list[str]:
    return [f"## {title}", "", *[f"    {line}" for line in lines], ""] if lines else []


def _preflight_lines(report: dict) -> list[str]:
    record = report.get("preflight")
    if not record:
        return []
    from .preflight import table

    return [f"checked {record['checked']} in {record['seconds']:.1f} s; clock skew up to "
            f"{1000 * record['clock_skew_s']:.1f} ms", *table(record["ranks"], record["clock_offsets_s"])]


def render_markdown(report: dict) -> str:
    t, w = report["timing"], report["world"]
    lines = [f"# fmnist-dist run `{report['run_id']}`", "", *[f"    {s.strip()}" for s in summary_lines(report)], "",
             f"Start-up {_secs(t.get('startup_s'))}, data loading {_secs(t.get('data_load_s'))}, "
             f"training {_secs(t.get('training_s'))}, evaluation {_secs(t.get('evaluation_s'))}, "
             f"total {_secs(t.get('total_s'))}. Rank imbalance {100 * t.get('imbalance', 0):.1f}% "
             f"(slowest rank's busy time over the mean). Model: {report['model']['description']} "
             f"({report['model']['parameters']:,} parameters, batch norm "
             f"{'yes' if report['model']['batch_norm'] else 'no'}).", "",
             *_section("Precision and CPUs", precision_lines(report)),
             *_section("Preflight", _preflight_lines(report)),
             "## Epochs", "",
             "| epoch | lr | train loss | train acc | val loss | val acc | training s | eval s | images/s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in report["epochs"]:
        lines.append(f"| {e['epoch']} | {e['lr']:.2e} | {e['train_loss']:.4f} | {_pct(e['train_accuracy'])} | "
                     f"{e['val_loss']:.4f} | {_pct(e['val_accuracy'])} | {e['training_s']:.2f} | "
                     f"{e['evaluation_s']:.2f} | {e['images_per_s']:.0f} |")
    lines += ["", "## Ranks (totals over epochs)", "",
              "| rank | host | threads | samples | data s | step s | fit s | wait s | eval s | images/s |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for rank in w["ranks"]:
        rows = [r for e in report["epochs"] for r in e["ranks"] if r["rank"] == rank["rank"]]
        total = {c: sum(r[c] for r in rows) for c in RANK_COLUMNS}
        ips = t.get("images_per_s_per_rank", {}).get(str(rank["rank"]), 0.0)   # none before epoch 1 ends
        lines.append(f"| {rank['rank']} | {rank['host']} | {rank['threads']} | {total['samples']} | "
                     f"{total['data_s']:.2f} | {total['step_s']:.2f} | {total['fit_s']:.2f} | "
                     f"{total['wait_s']:.2f} | {total['eval_s']:.2f} | {ips:.0f} |")
    lines += ["", "data s: building the epoch's shard; step s: inside training steps (compute and allreduce); "
              "fit s: the whole Keras fit call; wait s: waiting for the slowest rank at the epoch's end.", ""]
    from .timing import breakdown_lines  # where the time went (compute vs communication), issue 7
    lines += breakdown_lines(report)
    return "\n".join(lines)
