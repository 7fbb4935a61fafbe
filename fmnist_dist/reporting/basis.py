"""Accuracy against global batch, as measured: the basis of the time-to-accuracy projection and of
the warning a launch at unmeasured scale prints.

A scan is a set of completed runs of one recipe at several global batches (simulated ranks, see
fmnist_dist.scaling) and seeds. `scan_points` groups their reports into points (recipe, global
batch, epochs): the final test accuracies and each seed's validation accuracy per epoch.
`report RUNS --scan --format json` writes them; the file the package ships (BASIS_FILE) is such
an output, with the command that made it. Between two measured global batches, figures are
interpolated linearly in log2(global batch); outside, nothing is claimed.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from ..errors import ReportError

BASIS_FILE = Path(__file__).with_name("accuracy_basis.json")
SCAN_SCHEMA = "fmnist-dist/accuracy-basis"
# Keys that make runs points of one scan rather than different recipes.
SCAN_KEYS = ("train.seed", "train.simulate_world_size", "train.global_batch_size")


def scan_points(loaded: list[tuple[str, dict | None, str | None]]) -> list[dict]:
    """Completed runs grouped by (recipe, global batch, epochs), the seed left out."""
    from .compare import config_name, recipe_key

    groups: dict[tuple, list[dict]] = {}
    for _, report, _ in loaded:
        if report is None or report.get("status") != "completed":
            continue
        cfg = json.loads(json.dumps(report.get("config") or {}))
        train = cfg.get("train", {})
        seed = train.get("seed")
        for key in SCAN_KEYS:
            train.pop(key.split(".", 1)[1], None)
        # The recipe is the config as given; what the global batch made of it (the large-batch recipe,
        # chosen by the job) belongs to the point. Older reports: train as given.
        made = {k: v for k, v in (report["data"].get("scaling") or {}).items()
                if k in ("recipe", "optimizer", "warmup_epochs")}
        key = (config_name(report), recipe_key(cfg), report["data"]["global_batch_size"], len(report["epochs"]),
               made.get("recipe", "standard"))
        train = {**train, **{k: v for k, v in made.items() if k != "recipe"}}
        groups.setdefault(key, []).append({"seed": seed, "report": report, "train": train})
    points = []
    for (name, rkey, global_batch, epochs, scaling_recipe), runs in sorted(groups.items(), key=lambda kv: kv[0]):
        runs.sort(key=lambda r: r["seed"] or 0)
        t = runs[0]["train"]
        points.append({
            "recipe": name, "recipe_key": rkey, "lr_scaling": t.get("lr_scaling"), "lr": t.get("lr"),
            "warmup_epochs": t.get("warmup_epochs"), "optimizer": t.get("optimizer"), "scaling_recipe": scaling_recipe,
            "global_batch": global_batch, "epochs": epochs, "seeds": [r["seed"] for r in runs],
            "test_accuracy": [r["report"]["results"]["test_accuracy"] for r in runs],
            "val_curves": [[round(e["val_accuracy"], 5) for e in r["report"]["epochs"]] for r in runs],
            "precision": runs[0]["report"]["segments"][0].get("precision"),
        })
    return points


def load(path: str | Path = BASIS_FILE) -> dict:
    try:
        basis = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ReportError(f"{path}: cannot read the accuracy basis: {e}") from None
    if basis.get("schema") != SCAN_SCHEMA or not basis.get("points"):
        raise ReportError(f"{path}: not an accuracy basis (expected schema {SCAN_SCHEMA} with points)")
    return basis


def recipe_points(basis: dict, recipe_key: str | None = None) -> list[dict]:
    """The points of one recipe of the basis (default: its default_recipe), by global batch."""
    key = recipe_key or basis.get("default_recipe") or basis["points"][0]["recipe_key"]
    points = sorted((p for p in basis["points"] if p["recipe_key"] == key), key=lambda p: p["global_batch"])
    if not points:
        raise ReportError(f"the accuracy basis has no recipe {key!r} (it has: "
                          f"{', '.join(sorted({p['recipe_key'] for p in basis['points']}))})")
    batches = [p["global_batch"] for p in points]
    if len(set(batches)) < len(batches):
        raise ReportError(f"the accuracy basis has two points of recipe {key!r} at one global batch "
                          f"({sorted(b for b in set(batches) if batches.count(b) > 1)}): scan one setting per batch")
    return points


def measured_range(points: list[dict]) -> tuple[int, int]:
    return points[0]["global_batch"], points[-1]["global_batch"]


def first_epoch_at(curve: list[float], target: float) -> int | None:
    return next((i + 1 for i, acc in enumerate(curve) if acc >= target), None)


def point_summary(point: dict, target: float) -> dict:
    """One point: test accuracy mean and spread; epochs to the target validation accuracy per seed."""
    acc = point["test_accuracy"]
    epochs = [first_epoch_at(c, target) for c in point["val_curves"]]
    return {"global_batch": point["global_batch"], "epochs": point["epochs"], "seeds": len(acc),
            "accuracy_mean": statistics.fmean(acc), "accuracy_sd": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "accuracy_min": min(acc), "accuracy_max": max(acc),
            "epochs_to_target": None if None in epochs else max(epochs),   # every seed: the slowest one
            "epochs_to_target_per_seed": epochs}


def expect(points: list[dict], global_batch: int, target: float) -> dict:
    """What the basis says about a global batch: accuracy after the recipe's epochs, and epochs to
    the target (every seed), measured or interpolated in log2(global batch); None outside."""
    lo_g, hi_g = measured_range(points)
    out = {"global_batch": global_batch, "within": lo_g <= global_batch <= hi_g, "measured": [lo_g, hi_g],
           "accuracy_mean": None, "accuracy_sd": None, "epochs_to_target": None, "basis": None, "target": target}
    if not out["within"]:
        return out
    summaries = [point_summary(p, target) for p in points]
    below = max((s for s in summaries if s["global_batch"] <= global_batch), key=lambda s: s["global_batch"])
    above = min((s for s in summaries if s["global_batch"] >= global_batch), key=lambda s: s["global_batch"])
    f = 0.0 if above is below else (math.log2(global_batch / below["global_batch"])
                                    / math.log2(above["global_batch"] / below["global_batch"]))
    out["accuracy_mean"] = below["accuracy_mean"] + f * (above["accuracy_mean"] - below["accuracy_mean"])
    out["accuracy_sd"] = max(below["accuracy_sd"], above["accuracy_sd"])
    if below["epochs_to_target"] is not None and above["epochs_to_target"] is not None:
        out["epochs_to_target"] = math.ceil(below["epochs_to_target"]
                                            + f * (above["epochs_to_target"] - below["epochs_to_target"]) - 1e-9)
    out["basis"] = sorted({below["global_batch"], above["global_batch"]})
    out["epochs"] = below["epochs"]
    return out


def warning(points: list[dict], global_batch: int, recipe: str, target: float = 0.92) -> str | None:
    """A line for the job log when the global batch lies outside the measured basis, or where the
    basis says the recipe loses accuracy (below the target after its epochs)."""
    e = expect(points, global_batch, target)
    lo, hi = e["measured"]
    best = point_summary(points[0], target)
    worst = point_summary(points[-1], target)
    if global_batch < lo:
        return None                                # smaller batches: the 1- and 2-rank regime the recipes were tuned in
    if not e["within"]:
        return (f"global batch {global_batch} lies outside the measured accuracy basis ({lo}–{hi}, "
                f"{recipe} recipe): expect lower accuracy than measured at {hi} "
                f"({worst['accuracy_mean']:.2%} after {worst['epochs']} epochs, against {best['accuracy_mean']:.2%} "
                f"at {lo}), or more epochs to reach it (docs/scaling.md)")
    if e["accuracy_mean"] < target:
        return (f"at global batch {global_batch} the {recipe} recipe measured about {e['accuracy_mean']:.2%} "
                f"test accuracy after {e['epochs']} epochs (global batch {lo}: {best['accuracy_mean']:.2%}): "
                f"below {target:.0%} (docs/scaling.md)")
    return None


def render(points: list[dict], target: float, fmt: str = "text") -> str:
    """The accuracy-vs-global-batch table."""
    head = ["recipe", "optimizer", "lr scaling", "warm-up epochs", "global batch", "epochs", "seeds",
            "test acc mean", "± sd", "min–max", f"epochs to {target:.0%} val"]
    rows = []
    for p in points:
        s = point_summary(p, target)
        per_seed = s["epochs_to_target_per_seed"]
        rows.append([p["recipe"], str(p["optimizer"]), str(p["lr_scaling"]), f"{p['warmup_epochs']:g}",
                     str(p["global_batch"]), str(p["epochs"]),
                     ",".join(str(x) for x in p["seeds"]), f"{s['accuracy_mean']:.2%}", f"{s['accuracy_sd']:.2%}",
                     f"{s['accuracy_min']:.2%}–{s['accuracy_max']:.2%}",
                     "/".join("—" if x is None else str(x) for x in per_seed)])
    if fmt == "md":
        return "\n".join(["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3)]
                         + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    return "\n".join("  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in [head, *rows])


def launch_check(global_batch: int, target: float = 0.92) -> dict:
    """For the job log and the report at start: where this global batch lies in the shipped basis,
    what accuracy it measured there, and the warning line if any."""
    try:
        points = recipe_points(load())
    except ReportError as e:
        return {"basis": None, "warning": None, "problem": str(e)}
    recipe = points[0]["recipe"]
    e = expect(points, global_batch, target)
    lo, hi = e["measured"]
    note = None if e["within"] else (f"global batch {global_batch} is outside the accuracy basis ({recipe} recipe, "
                                     f"global batch {lo}–{hi}): not measured")
    return {"basis": f"{recipe} recipe, global batch {lo}–{hi}", "within": e["within"],
            "expected_accuracy": e["accuracy_mean"], "epochs": e.get("epochs"), "note": note,
            "warning": warning(points, global_batch, recipe, target)}
