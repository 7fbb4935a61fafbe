"""The split of each rank's step time into compute and communication, and the totals per rank and
category (see timing/__init__ for the methods). Pure Python: reports are read without TensorFlow."""
from __future__ import annotations

import os
import statistics

# Order of the categories in tables and stacked bars (seconds per rank, summed over epochs).
CATEGORIES = ("startup_s", "data_s", "compute_s", "comm_s", "wait_s", "other_s", "eval_s", "checkpoint_s")
CATEGORY_LABELS = {
    "startup_s": "start-up", "data_s": "data input", "compute_s": "compute",
    "comm_s": "communication", "wait_s": "wait for slowest rank", "other_s": "framework overhead",
    "eval_s": "evaluation", "checkpoint_s": "checkpointing",
}
METHOD_TEXT = {
    "probe": "in-process allreduce probe: comm = steps x the probe's time per grouped allreduce "
             "of the gradients (an estimate: no overlap with back-propagation assumed); compute = step time - comm",
    "timeline": "Horovod timeline: comm = measured time collectives ran during each epoch's fit; "
                "compute = step time - comm",
    "single": "1 rank: Horovod does no allreduce; compute = step time, comm = 0",
}


def cpu_snapshot() -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for a CPU) summed over this process's
    threads, from the scheduler's /proc/self/task/*/schedstat (0, 0 where it is not available).
    Waiting means the node's cores were busy: with other ranks, other jobs, or own threads."""
    run = wait = 0
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return 0.0, 0.0
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                fields = f.read().split()
            run += int(fields[0])
            wait += int(fields[1])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return run / 1e9, wait / 1e9


def step_statistics(steps: list[float]) -> dict:
    """One rank's step times in one epoch: median, interquartile spread, and the first step's
    excess over the median (graph tracing and optimisation when the train function first runs)."""
    if not steps:
        return {"step_median_s": 0.0, "step_spread": 0.0, "tracing_s": 0.0}
    median = statistics.median(steps)
    q = statistics.quantiles(steps, n=4) if len(steps) >= 4 else [median, median, median]
    first_excess = steps[0] - median
    return {"step_median_s": median, "step_spread": (q[2] - q[0]) / median if median > 0 else 0.0,
            # only a first step far slower than the rest is tracing, not noise
            "tracing_s": first_excess if len(steps) > 1 and steps[0] > 3 * median else 0.0}


def split_record(r: dict, size: int, probe_s: float, measured: dict | None) -> None:
    """compute + comm + tracing = step_s; other_s = fit_s - step_s + tracing (framework overhead)."""
    tracing = min(r.get("tracing_s", 0.0), r["step_s"])
    inside = r["step_s"] - tracing
    if size == 1:
        comm, method = 0.0, "single"
    elif measured is not None:
        comm, method = measured["comm_s"], "timeline"
        r["negotiate_s"] = measured["negotiate_s"]
    else:
        comm, method = r["steps"] * probe_s, "probe"
    comm = min(comm, inside)  # an estimate can exceed what was measured; never below 0 compute
    r["comm_s"], r["compute_s"], r["comm_method"] = comm, inside - comm, method
    r["other_s"] = max(0.0, r["fit_s"] - r["step_s"]) + tracing


def rank_totals(report: dict, startup_ranks: dict[str, float] | None = None) -> list[dict]:
    """Seconds per rank and category, summed over epochs (start-up once)."""
    startup_ranks = startup_ranks or {}
    out: dict[int, dict] = {}
    for e in report["epochs"]:
        for r in e["ranks"]:
            row = out.setdefault(r["rank"], {"rank": r["rank"], "host": r["host"],
                                             **{c: 0.0 for c in CATEGORIES}, "steps": 0, "samples": 0})
            for c in CATEGORIES[1:]:
                row[c] += r.get(c, 0.0) or 0.0
            row["steps"] += r.get("steps", 0)
            row["samples"] += r.get("samples", 0)
    default_startup = report.get("timing", {}).get("startup_s", 0.0) or 0.0
    for rank, row in out.items():
        row["startup_s"] = startup_ranks.get(str(rank), default_startup)
        row["total_s"] = sum(row[c] for c in CATEGORIES)
    return [out[k] for k in sorted(out)]


def breakdown_rows(report: dict) -> list[dict]:
    b = report.get("breakdown")
    if b and b.get("ranks"):
        return b["ranks"]
    return rank_totals(report)
