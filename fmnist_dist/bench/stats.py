"""The benchmark's arithmetic: medians and spreads per variant, ratios of launches of one repetition."""
from __future__ import annotations

import os
import statistics

from .variants import BASELINE, COMPARISONS, Variant, display_command, mismatches

NOT_AS_NAMED = "did not run as named: "


def stats(values: list) -> dict:
    good = [x for x in values if x is not None]
    if not good:
        return {"median": None, "min": None, "max": None, "spread": None}
    med = statistics.median(good)
    return {"median": med, "min": min(good), "max": max(good),
            "spread": (max(good) - min(good)) / med if med else None}


def summarize_variants(variants: list[Variant], per_variant: dict, environments: dict, model: dict | None,
                       peak: dict | None) -> list[dict]:
    base = per_variant.get(BASELINE)
    rows = []
    for v in variants:
        s = stats(per_variant[v.name])
        train_flops = model["train_flops_per_image"] if model else None
        gflops = s["median"] * train_flops / 1e9 if s["median"] is not None and train_flops else None
        fractions = peak_fractions(per_variant[v.name], train_flops, peak, "bf16" if v.bf16 else "fp32")
        vs = None
        if base and v.name != BASELINE:
            ratios = [a / b for a, b in zip(per_variant[v.name], base) if a and b]
            vs = statistics.median(ratios) if ratios else None
        elif base and v.name == BASELINE and s["median"] is not None:
            vs = 1.0
        rows.append({"name": v.name, "title": v.title, "group": v.group, "launcher": v.launcher,
                     "ranks": v.ranks, "threads_per_rank": threads_in_use(environments.get(v.name) or {}, v.ranks),
                     "precision": v.precision, "intel": v.intel, "command": display_command(v),
                     "images_per_s": per_variant[v.name], **s, "gflops": gflops,
                     "peak_fraction": stats(fractions)["median"], "peak_fractions": fractions,
                     "peak_used": "bf16" if v.bf16 else "fp32",
                     "vs_baseline": vs, "environment": environments.get(v.name)})
    return rows


def peak_fractions(images_per_s: list, train_flops: float | None, peak: dict | None, precision: str) -> list:
    """Each repetition's training GFLOP/s over the peak probed at the start of that repetition. A
    shared machine's pace drifts by tens of percent within a run: paired with its neighbour in time,
    a launch in a slow minute is not held against a probe from a fast one."""
    probed = {s["rep"]: max(s[precision]) for s in (peak or {}).get("samples", []) if s.get(precision)}
    return [x * train_flops / 1e9 / probed[rep] if x and train_flops and rep in probed else None
            for rep, x in enumerate(images_per_s, start=1)]


def threads_in_use(environment: dict, ranks: int) -> int:
    """A rank's threads: inside each op times the ops run side by side (simulated ranks' towers)."""
    intra = environment.get("intra_op_threads")
    return intra * (environment.get("inter_op_threads") or 1) if intra else max(1, (os.cpu_count() or 1) // ranks)


def compare(per_variant: dict) -> list[dict]:
    out = []
    for name, what, a, b in COMPARISONS:
        if a not in per_variant or b not in per_variant:
            continue
        ratios = [x / y if x and y else None for x, y in zip(per_variant[a], per_variant[b])]
        out.append({"name": name, "what": what, "a": a, "b": b, "ratios": ratios, **_ratio_stats(ratios)})
    return out


def _ratio_stats(ratios: list) -> dict:
    s = stats(ratios)
    return {"median": s["median"], "min": s["min"], "max": s["max"]}


def count_if_ran_as_named(v: Variant, launch: dict, result: dict | None) -> dict | None:
    """Judge a finished launch by what its worker found in effect: the launch records `in_effect`
    (per rank) and `ran_as_named`; one that did not run as named becomes an error naming the
    mismatch, and its figure (kept as uncounted_images_per_s) is not the variant's. Returns the
    result to count, or None."""
    if result is None:
        return None
    records = [r.get("in_effect") for r in result["ranks"]]
    wrong = (["no record of what was in effect"] if None in records else mismatches(v, records))
    launch["in_effect"] = records
    launch["ran_as_named"] = not wrong
    if not wrong:
        return result
    launch.update(ok=False, error=NOT_AS_NAMED + "; ".join(wrong),
                  uncounted_images_per_s=result.get("images_per_s"))
    return None
