"""Where the time went: compute vs communication per epoch and rank, start-up, and the allreduce probe.

Two methods split the time a rank spends inside training steps (`step_s`) into compute and
communication; the report says which one produced each number (`breakdown.method`, and
`comm_method` in every per-epoch rank record):

* **probe** (always available, cheap): at start-up every rank runs a short allreduce probe, a
  `tf.function` doing one grouped allreduce of zero tensors shaped like the model's trainable
  variables (what `DistributedOptimizer` allreduces every step), timed over PROBE_CALLS calls after
  PROBE_WARMUP warm-up calls. Communication per epoch is estimated as steps x the probe's median
  time per call, compute = step_s - comm. It measures one fused allreduce on otherwise idle ranks;
  in training the gradients become ready at different times during back-propagation and are
  reduced in several rounds while compute competes for the cores, so the probe is a lower bound
  for the communication cost (on this project's 2-core test machine the timeline measured about
  5x the probe; see docs/reading-reports.md). The same probe times single tensors of PROBE_SIZES
  bytes (eager calls) and fits seconds = latency + bytes / bandwidth (used by
  `fmnist_dist.projection`).
* **timeline** (`report.timeline: true`, or HOROVOD_TIMELINE set by the launcher): Horovod's own
  timeline records every collective; communication per epoch is the measured union of the time the
  collectives (ALLREDUCE, ALLGATHER, BROADCAST, ...) were running during that epoch's `fit`, after
  negotiation (negotiation = waiting until every rank submitted the tensor is reported separately
  as `negotiate_s`). With `report.timeline` fmnist-dist sets HOROVOD_TIMELINE=DYNAMIC before
  Horovod starts and records one file per epoch, RUN_DIR/timeline/epoch-NNN.json; when the launcher
  set HOROVOD_TIMELINE to a file, that file (the whole run) is read at the end of every epoch and
  split by the epochs' wall-clock windows. An epoch trained in several `fit` calls (chunks between
  stop checks or checkpoints) gets one file per chunk, epoch-NNN-K.json. The timeline is written by rank 0 (Horovod's
  coordinator); a collective runs on all ranks at once, so its time is attributed to every rank.

With one rank, Horovod's optimizer does no allreduce at all: communication is 0, compute = step_s.

Every per-epoch rank record gets compute_s, comm_s, comm_method, other_s (framework overhead:
fit_s - step_s, the part of Keras `fit` outside steps — callbacks, iterator set-up — plus
tracing_s, the first step's excess over the median step when it is over 3x the median: graph
tracing and optimisation), step_median_s and step_spread (interquartile range / median of the
rank's step times), cpu_s / cpu_wait_s (thread-seconds the rank's threads ran / were runnable
but waited for a core during fit, from /proc/self/task/*/schedstat), cpu_wait_share
(= cpu_wait_s / (cpu_s + cpu_wait_s): how oversubscribed the node was), loadavg (1-minute load at
the end of fit) and checkpoint_s (the training loop adds the end-of-epoch checkpoint write to rank
0's record; 0.0 on the other ranks).
compute_s + comm_s + tracing_s = step_s. See report.py for the schema.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any

PROBE_CALLS = 20
PROBE_WARMUP = 3
# Message sizes for the latency/bandwidth fit: 4 KiB .. 4 MiB, x4 apart.
PROBE_SIZES = tuple(4096 * 4 ** i for i in range(6))
PROBE_SIZE_CALLS = 8
COLLECTIVES = ("ALLREDUCE", "ALLGATHER", "BROADCAST", "ALLTOALL", "REDUCESCATTER", "ADASUM")
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


def prepare_environment(ns: Any, environ: dict = os.environ) -> None:
    """Before Horovod starts: ask for a dynamic timeline when report.timeline is on (and the
    launcher did not already set HOROVOD_TIMELINE)."""
    if getattr(getattr(ns, "report", None), "timeline", False) and not environ.get("HOROVOD_TIMELINE"):
        environ["HOROVOD_TIMELINE"] = "DYNAMIC"


def timeline_mode(environ: dict = os.environ) -> str | None:
    """None (no timeline), 'per-epoch' (dynamic, one file per epoch) or 'whole-run' (a file)."""
    value = environ.get("HOROVOD_TIMELINE", "")
    if not value:
        return None
    return "per-epoch" if value.upper() == "DYNAMIC" else "whole-run"


# --------------------------------------------------------------------------------------------
# The probe (collective: every rank calls it at the same point)

def probe_allreduce(rt, variables, calls: int = PROBE_CALLS, warmup: int = PROBE_WARMUP,
                    sizes: tuple = PROBE_SIZES, size_calls: int = PROBE_SIZE_CALLS) -> dict:
    """Time a grouped allreduce shaped like the gradients, and single allreduces of `sizes` bytes.

    Returns the probe section of report.json (rank 0's view plus every rank's median)."""
    import tensorflow as tf

    grad_bytes = int(sum(int(v.shape.num_elements()) * v.dtype.size for v in variables))
    out = {"tensors": len(variables), "gradient_bytes": grad_bytes, "calls": calls, "warmup": warmup,
           "ranks": rt.size}
    if rt.size == 1:
        out.update(skipped="1 rank: Horovod's optimizer does no allreduce", seconds_per_call=0.0,
                   seconds_per_call_ranks={"0": 0.0}, spread=0.0, sizes=[], fit=None, probe_s=0.0)
        return out
    hvd = rt.hvd_tf
    t_start = time.perf_counter()
    zeros = [tf.zeros(v.shape, v.dtype) for v in variables]

    @tf.function
    def grouped(ts):
        return hvd.grouped_allreduce(ts, op=hvd.Average)

    times = _time_calls(lambda: grouped(zeros), calls, warmup)
    sweep = []
    for nbytes in sizes:  # eager: no tracing per size (a traced function per size costs ~1 s each)
        tensor = tf.zeros([nbytes // 4], tf.float32)
        single = lambda: hvd.allreduce(tensor, op=hvd.Average, name=f"fmnist_probe_{nbytes}")  # noqa: E731
        sweep.append((nbytes, statistics.median(_time_calls(single, size_calls, 2))))
    mine = {"median": statistics.median(times), "times": times, "sweep": sweep}
    everyone = hvd.allgather_object(mine)
    # A collective finishes on all ranks together; take the slowest rank's median (what a step waits for).
    per_rank = {str(r): m["median"] for r, m in enumerate(everyone)}
    seconds = max(per_rank.values())
    slowest = everyone[max(range(len(everyone)), key=lambda r: everyone[r]["median"])]["times"]
    q = statistics.quantiles(slowest, n=4) if len(slowest) >= 4 else [seconds, seconds, seconds]
    sizes_out = [{"bytes": n, "seconds": max(m["sweep"][i][1] for m in everyone)} for i, (n, _) in enumerate(sweep)]
    out.update(seconds_per_call=seconds, seconds_per_call_ranks=per_rank,
               spread=(q[2] - q[0]) / seconds if seconds > 0 else 0.0,
               sizes=sizes_out, fit=fit_latency_bandwidth(sizes_out),
               probe_s=time.perf_counter() - t_start)
    return out


def _time_calls(fn, calls: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        _sync(fn())
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        _sync(fn())
        times.append(time.perf_counter() - t)
    return times


def _sync(result) -> None:
    first = result[0] if isinstance(result, (list, tuple)) else result
    first.numpy()


def fit_latency_bandwidth(points: list[dict]) -> dict | None:
    """Least-squares fit of seconds = latency_s + bytes / bandwidth_Bps over the probe's sizes."""
    if len(points) < 2:
        return None
    xs = [float(p["bytes"]) for p in points]
    ys = [float(p["seconds"]) for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0
    slope = max(slope, 1e-15)  # a bandwidth, however high; never negative
    latency = max(0.0, my - slope * mx)
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - (latency + slope * x)) ** 2 for x, y in zip(xs, ys))
    return {"latency_s": latency, "bandwidth_Bps": 1.0 / slope,
            "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0,
            "model": "seconds = latency_s + bytes / bandwidth_Bps, measured on the job's ranks"}


# --------------------------------------------------------------------------------------------
# Horovod timeline

def read_timeline(path: str) -> list[dict]:
    """The events of a Chrome-trace timeline, also when Horovod has not finished writing it."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except OSError:
        return []
    if not text:
        return []
    if not text.endswith("]"):
        text = text.rstrip().rstrip(",")
        # a half-written last event: cut back to the last complete one
        cut = text.rfind("}")
        while cut > 0:
            try:
                return json.loads(text[: cut + 1] + "]")
            except json.JSONDecodeError:
                cut = text.rfind("}", 0, cut)
        return []
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return []


def timeline_intervals(events: list[dict]) -> tuple[float | None, list[tuple[float, float]], list[tuple[float, float]]]:
    """(start wall-clock seconds, collective intervals, negotiation intervals), intervals in
    seconds of wall-clock time (the timeline's ts are microseconds since its start)."""
    start_us = None
    stacks: dict[Any, list[tuple[str, float]]] = {}
    comm, nego = [], []
    for ev in events:
        ph = ev.get("ph")
        if ph == "M":
            start = (ev.get("args") or {}).get("start_time_since_epoch_in_micros")
            if start is not None:
                start_us = start
            continue
        if ph == "B":
            stacks.setdefault(ev.get("pid"), []).append((ev.get("name", ""), ev["ts"]))
        elif ph == "E":
            stack = stacks.get(ev.get("pid"))
            if not stack:
                continue
            name, begin = stack.pop()
            if stack:  # a sub-activity (MEMCPY_IN_FUSION_BUFFER, MPI_ALLREDUCE, ...)
                continue
            if name.startswith("NEGOTIATE"):
                nego.append((begin, ev["ts"]))
            elif name in COLLECTIVES:
                comm.append((begin, ev["ts"]))
    base = (start_us or 0) / 1e6
    to_s = lambda iv: [(base + a / 1e6, base + b / 1e6) for a, b in iv]  # noqa: E731
    return (base if start_us is not None else None), to_s(comm), to_s(nego)


def union_seconds(intervals: list[tuple[float, float]], window: tuple[float, float] | None = None) -> float:
    """Length of the union of intervals, clipped to window."""
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if window is not None:
            a, b = max(a, window[0]), min(b, window[1])
        if b <= a:
            continue
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


# --------------------------------------------------------------------------------------------
# The per-run object the training loop talks to

class Timing:
    """Created on every rank after the model is built; collective calls (probe, timeline start and
    stop) happen on every rank, report work on rank 0 only."""

    def __init__(self, rt, run_dir: str, startup_s: float, probe: dict, mode: str | None,
                 startup_ranks: dict[str, float], plots: bool = True, tensorboard: bool = True):
        self.rt, self.run_dir, self.probe, self.mode = rt, run_dir, probe, mode
        self.plots, self.tensorboard_on = plots, tensorboard
        self.startup_s = startup_s
        self.startup_ranks = startup_ranks
        self.windows: dict[int, list[tuple[float, float, str | None]]] = {}  # epoch -> fit chunks
        self.steps: dict[int, list[float]] = {}       # epoch -> this rank's step times
        self.cpu: dict[int, list[float]] = {}         # epoch -> this rank's [cpu_s, cpu_wait_s] in fit
        self.step_stats: dict[int, list[dict]] = {}   # epoch -> per rank (index = rank)
        self.epoch = 0
        self._writer = None

    # -- collective, every rank
    def callbacks(self) -> list:
        """A Keras callback recording each fit call's wall-clock window (one fit = one epoch) and,
        with a per-epoch timeline, starting and stopping Horovod's timeline around it."""
        import tensorflow as tf

        timing = self

        class EpochWindow(tf.keras.callbacks.Callback):
            """An epoch may take several fit calls (chunks between checkpoints or stop checks):
            windows and step times are kept per epoch, a timeline file per chunk."""

            def on_epoch_begin(self, epoch, logs=None):
                timing.epoch = epoch + 1                     # fit(initial_epoch=epoch - 1, ...)
                chunks = timing.windows.setdefault(timing.epoch, [])
                self._path = None
                if timing.mode == "per-epoch":
                    self._path = timing.timeline_path(timing.epoch, len(chunks) + 1)
                    if timing.rt.rank == 0:
                        os.makedirs(os.path.dirname(self._path), exist_ok=True)
                    timing.rt.hvd.start_timeline(self._path)
                elif timing.mode == "whole-run":
                    self._path = os.environ["HOROVOD_TIMELINE"]
                timing.steps.setdefault(timing.epoch, [])
                self._cpu0 = cpu_snapshot()
                self._t0 = time.time()

            def on_train_batch_begin(self, batch, logs=None):
                self._b = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                timing.steps[timing.epoch].append(time.perf_counter() - self._b)

            def on_epoch_end(self, epoch, logs=None):
                timing.windows[timing.epoch].append((self._t0, time.time(), self._path))
                if timing.mode == "per-epoch":
                    timing.rt.hvd.stop_timeline()

            def on_train_end(self, logs=None):
                run, wait = (b - a for a, b in zip(self._cpu0, cpu_snapshot()))
                cpu = timing.cpu.setdefault(timing.epoch, [0.0, 0.0])
                cpu[0] += run
                cpu[1] += wait
                # every rank is here (end of fit): gather each rank's step-time statistics so far
                stats = step_statistics(timing.steps.get(timing.epoch, []))
                stats.update(cpu_s=cpu[0], cpu_wait_s=cpu[1],
                             cpu_wait_share=cpu[1] / (cpu[0] + cpu[1]) if cpu[0] + cpu[1] > 0 else 0.0,
                             loadavg=os.getloadavg()[0])
                timing.step_stats[timing.epoch] = timing.rt.hvd_tf.allgather_object(stats)

        return [EpochWindow()]

    def timeline_path(self, epoch: int, chunk: int = 1) -> str:
        if self.mode == "whole-run":
            return os.environ["HOROVOD_TIMELINE"]
        suffix = "" if chunk == 1 else f"-{chunk}"
        return os.path.join(self.run_dir, "timeline", f"epoch-{epoch:03d}{suffix}.json")

    def close(self) -> None:
        """End of training (rank 0, Horovod's timeline writer): close a whole-run timeline so it
        can be read completely (the test evaluation after it is not recorded)."""
        if self.mode == "whole-run":
            try:
                self.rt.hvd.stop_timeline()
            except Exception:  # noqa: BLE001 - the numbers fall back to the probe
                pass

    # -- rank 0
    def split(self, epoch: int, records: list[dict]) -> list[dict]:
        """Add compute_s / comm_s / other_s / checkpoint_s / comm_method to every rank's record."""
        measured = self.measured_comm(epoch)
        stats = self.step_stats.get(epoch) or []
        for r in records:
            r.setdefault("checkpoint_s", 0.0)
            if r["rank"] < len(stats):
                r.update(stats[r["rank"]])
            split_record(r, self.rt.size, self.probe.get("seconds_per_call", 0.0), measured)
        return records

    def measured_comm(self, epoch: int) -> dict | None:
        """Communication measured by the timeline during the epoch's fit chunks, or None."""
        if self.mode is None or self.rt.size == 1 or not self.windows.get(epoch):
            return None
        comm_s = nego_s = 0.0
        cache: dict[str, tuple] = {}
        for t0, t1, path in self.windows[epoch]:
            if path not in cache:
                cache[path] = timeline_intervals(read_timeline(path))
            start, comm, nego = cache[path]
            if start is None or not comm:
                return None
            comm_s += union_seconds(comm, (t0, t1))
            nego_s += union_seconds(nego, (t0, t1))
        if comm_s <= 0:
            return None
        return {"comm_s": comm_s, "negotiate_s": nego_s}

    def after_epoch(self, report: dict) -> None:
        """Rank 0, after the epoch's summary and timing: the breakdown section and TensorBoard."""
        report["breakdown"] = self.section(report)
        if self.tensorboard_on:
            self.tensorboard(report)

    def resplit(self, report: dict) -> None:
        """At the end (rank 0): re-read the timeline for every epoch (a whole-run file is complete
        only now) and redo the split."""
        for e in report["epochs"]:
            if e["epoch"] in self.windows:  # not epochs of an earlier segment (resumed run)
                self.split(e["epoch"], e["ranks"])

    def section(self, report: dict) -> dict:
        """report['breakdown']: the method and the per-rank totals over epochs."""
        methods = {r.get("comm_method") for e in report["epochs"] for r in e["ranks"]}
        method = "timeline" if methods == {"timeline"} else ("single" if self.rt.size == 1 else
                 ("probe" if methods <= {"probe"} else "mixed"))
        detail = METHOD_TEXT.get(method, "timeline where it could be read, probe otherwise (see comm_method per epoch)")
        return {"method": method, "method_detail": detail,
                "timeline": ({"mode": self.mode,
                              "files": sorted({w[2] for chunks in self.windows.values() for w in chunks if w[2]})}
                             if self.mode else None),
                "categories": list(CATEGORIES), "probe": self.probe,
                "ranks": rank_totals(report, self.startup_ranks)}

    def tensorboard(self, report: dict, final: bool = False) -> None:
        """Rank 0: the last epoch's scalars (or, at the end, the test results) to RUN_DIR/tensorboard."""
        import tensorflow as tf

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(os.path.join(self.run_dir, "tensorboard"))
        e = report["epochs"][-1]
        with self._writer.as_default(step=e["epoch"]):
            if final:
                res = report.get("results", {})
                for name, key in (("loss/test", "test_loss"), ("accuracy/test", "test_accuracy")):
                    if res.get(key) is not None:
                        tf.summary.scalar(name, res[key])
                for name, key in (("time/training_total_s", "training_s"), ("time/startup_s", "startup_s"),
                                  ("throughput/images_per_s_run", "images_per_s")):
                    if report["timing"].get(key) is not None:
                        tf.summary.scalar(name, report["timing"][key])
            else:
                scalars = {"loss/train": e["train_loss"], "loss/validation": e["val_loss"],
                           "accuracy/train": e["train_accuracy"], "accuracy/validation": e["val_accuracy"],
                           "learning_rate": e["lr"], "throughput/images_per_s": e["images_per_s"],
                           "time/epoch_training_s": e["training_s"], "time/epoch_evaluation_s": e["evaluation_s"]}
                for r in e["ranks"]:
                    busy = r["data_s"] + r["fit_s"]
                    scalars[f"throughput/rank{r['rank']}_images_per_s"] = r["samples"] / busy if busy > 0 else 0.0
                for name, value in scalars.items():
                    tf.summary.scalar(name, value)
        self._writer.flush()
        if final:
            self._writer.close()


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


def start(rt, model, ns: Any, run_dir: str, startup_s: float) -> Timing:
    """Every rank, after the model and optimizer exist and before the first step: gather the
    ranks' start-up times, run the allreduce probe."""
    startup_ranks = {str(r): s for r, s in enumerate(rt.hvd_tf.allgather_object(startup_s))}
    probe = probe_allreduce(rt, model.trainable_variables)
    rep = getattr(ns, "report", None)
    return Timing(rt, run_dir, startup_s, probe, timeline_mode(), startup_ranks,
                  plots=getattr(rep, "plots", True), tensorboard=getattr(rep, "tensorboard", True))


def finish(timing: Timing, report: dict) -> list[str]:
    """Rank 0, at the very end: close a whole-run timeline, final split, TensorBoard test scalars,
    plots. Returns the plot paths; a failure to plot is reported, never fatal."""
    timing.close()
    timing.resplit(report)
    report["breakdown"] = timing.section(report)
    if timing.tensorboard_on:
        timing.tensorboard(report, final=True)
    if not timing.plots:
        return []
    try:
        from . import plots
        return plots.plot_run(report, timing.run_dir)
    except Exception as e:  # noqa: BLE001 - plots are a convenience; the report is written regardless
        print(f"fmnist-dist: warning: could not write plots: {e}", flush=True)
        return []


# --------------------------------------------------------------------------------------------
# Reading (for report rendering): works on any report, also older ones without a breakdown

def breakdown_rows(report: dict) -> list[dict]:
    b = report.get("breakdown")
    if b and b.get("ranks"):
        return b["ranks"]
    return rank_totals(report)


def breakdown_lines(report: dict) -> list[str]:
    """Markdown lines: where the time went, per rank, with the method."""
    b = report.get("breakdown") or {}
    rows = breakdown_rows(report)
    if not rows:
        return []
    lines = ["## Where the time went (seconds per rank, summed over epochs)", "",
             f"Method: **{b.get('method', 'unknown')}** — {b.get('method_detail', 'no breakdown in this report')}.", "",
             "| rank | host | " + " | ".join(CATEGORY_LABELS[c] for c in CATEGORIES) + " | total |",
             "|---:|---|" + "---:|" * (len(CATEGORIES) + 1)]
    for row in rows:
        lines.append(f"| {row['rank']} | {row['host']} | " + " | ".join(f"{row.get(c, 0.0):.2f}" for c in CATEGORIES)
                     + f" | {row.get('total_s', 0.0):.2f} |")
    probe = b.get("probe") or {}
    if probe.get("seconds_per_call"):
        fit = probe.get("fit") or {}
        lines += ["", f"Allreduce probe on {probe['ranks']} ranks: {probe['tensors']} gradient tensors, "
                      f"{probe['gradient_bytes'] / 1e6:.2f} MB, {1e3 * probe['seconds_per_call']:.2f} ms per "
                      f"grouped allreduce (median of {probe['calls']}; interquartile spread "
                      f"{100 * probe.get('spread', 0):.0f}%)"
                  + (f"; fit over {len(probe.get('sizes', []))} sizes: latency {1e6 * fit['latency_s']:.0f} µs, "
                     f"bandwidth {fit['bandwidth_Bps'] / 1e9:.2f} GB/s (R² {fit['r2']:.2f})" if fit else "") + "."]
    lines += ["", "start-up: process start to the first step (per rank); data input: building the epoch's "
              "shard; compute and communication: the split of the time inside training steps; wait: at the "
              "epoch's end for the slowest rank; framework overhead: Keras fit outside steps (graph "
              "tracing in the first step, callbacks, creating and tearing down the data iterator); evaluation: validation each epoch; checkpointing: writing checkpoints.", ""]
    return lines


def share_line(report: dict) -> str | None:
    """One summary line: the shares of the time summed over ranks."""
    rows = breakdown_rows(report)
    total = sum(row.get("total_s", 0.0) for row in rows)
    if total <= 0:
        return None
    parts = [f"{CATEGORY_LABELS[c]} {100 * sum(row.get(c, 0.0) for row in rows) / total:.0f}%"
             for c in CATEGORIES if sum(row.get(c, 0.0) for row in rows) > 0]
    method = (report.get("breakdown") or {}).get("method", "no split")
    return "  time: " + " · ".join(parts) + f" (method: {method})"
