"""The allreduce probe: collective, every rank calls it at the same point (see timing/__init__)."""
from __future__ import annotations

import statistics
import time

import tensorflow as tf

PROBE_CALLS = 20
PROBE_WARMUP = 3
PROBE_SIZES = tuple(4096 * 4 ** i for i in range(6))
PROBE_SIZE_CALLS = 8


def probe_allreduce(rt, variables, calls: int = PROBE_CALLS, warmup: int = PROBE_WARMUP,
                    sizes: tuple = PROBE_SIZES, size_calls: int = PROBE_SIZE_CALLS) -> dict:
    """Time a grouped allreduce shaped like the gradients, and single allreduces of `sizes` bytes.

    Returns the probe section of report.json (rank 0's view plus every rank's median)."""
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
