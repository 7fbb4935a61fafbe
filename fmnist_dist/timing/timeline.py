"""Horovod's timeline: reading which collectives ran when (see timing/__init__). Asking for it is
environment.request_timeline's job, before Horovod starts."""
from __future__ import annotations

import json
import os
from typing import Any

COLLECTIVES = ("ALLREDUCE", "ALLGATHER", "BROADCAST", "ALLTOALL", "REDUCESCATTER", "ADASUM")


def timeline_mode(environ: dict = os.environ) -> str | None:
    """None (no timeline), 'per-epoch' (dynamic, one file per epoch) or 'whole-run' (a file)."""
    value = environ.get("HOROVOD_TIMELINE", "")
    if not value:
        return None
    return "per-epoch" if value.upper() == "DYNAMIC" else "whole-run"


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
