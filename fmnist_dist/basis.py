"""The accuracy bases the package ships, one per recipe (fmnist_dist/bases/NAME.json): test accuracy
against global batch as measured (ranks simulated in one process, 3 seeds), the recipe's stated
target, and the throughput of one rank against its batch on the CPU that measured it.

A run uses its own recipe's basis only: `for_config` matches the run's config to a basis's config by
their experiment key (seeds, the simulated world, the global batch and the stop target left out), and
answers None, never another recipe's basis, when none matches. Between two measured global batches
figures are interpolated linearly in log2(global batch); outside them nothing is claimed.
A basis is `report RUNS --scan --format json` (reporting/scan.py) with the recipe's config, target and
throughput added (docs/scaling.md says how each shipped one was made).
"""
from __future__ import annotations

import functools
import json
import math
import statistics
from pathlib import Path

from . import config as config_mod
from .errors import ReportError

BASES_DIR = Path(__file__).with_name("bases")
SCHEMA = "fmnist-dist/accuracy-basis"
# The study's bar, and the target of a recipe whose basis states none.
DEFAULT_TARGET = 0.92
# Keys a scan varies, or that end a run early without changing its course: runs that differ only in
# these are points of one basis.
SCAN_KEYS = ("train.seed", "train.simulate_world_size", "train.global_batch_size", "train.target_accuracy")


def shown_path(basis: dict) -> str:
    """Where the basis came from, as a user would name it: a shipped one relative to the checkout."""
    path = Path(basis.get("path", "given"))
    try:
        return str(path.resolve().relative_to(BASES_DIR.parent.parent))
    except ValueError:
        return str(path)


def basis_key(cfg: dict) -> str:
    return config_mod.experiment_key(cfg, drop=SCAN_KEYS)


def load(path: str | Path) -> dict:
    try:
        basis = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ReportError(f"{path}: cannot read the accuracy basis: {e}") from None
    if basis.get("schema") != SCHEMA or not basis.get("points"):
        raise ReportError(f"{path}: not an accuracy basis (expected schema {SCHEMA} with points)")
    if not isinstance(basis.get("config"), dict):
        raise ReportError(f"{path}: the accuracy basis names no recipe config (key 'config'): it cannot be matched "
                          "to a run")
    basis["path"] = str(path)
    return basis


@functools.lru_cache(maxsize=1)
def shipped() -> tuple[dict, ...]:
    return tuple(load(p) for p in sorted(BASES_DIR.glob("*.json")))


def for_config(cfg: dict, bases: tuple[dict, ...] | None = None) -> dict | None:
    """The basis measured for this run's recipe, or None."""
    key = basis_key(cfg)
    return next((b for b in (shipped() if bases is None else bases) if basis_key(b["config"]) == key), None)


def missing_line(cfg: dict) -> str:
    names = ", ".join(f"{b['recipe']} ({basis_key(b['config'])})" for b in shipped())
    return (f"no accuracy basis was measured for this recipe (experiment key {basis_key(cfg)}; shipped: {names}): "
            "no accuracy is expected and none is warned of")


def target_of(cfg: dict, basis: dict | None) -> float:
    """The run's own target: train.target_accuracy, else the recipe's stated one."""
    given = cfg["train"].get("target_accuracy")
    return given if given is not None else (basis or {}).get("target") or DEFAULT_TARGET


def recipe_points(basis: dict) -> list[dict]:
    """The basis's points at the recipe's own epochs, by global batch."""
    points = sorted(basis["points"], key=lambda p: p["global_batch"])
    batches = [p["global_batch"] for p in points]
    if len(set(batches)) < len(batches):
        raise ReportError(f"the accuracy basis has two points at one global batch "
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


def epochs_trained(expected: dict, early_stop: bool) -> int | None:
    """The epochs a job trains at an expect()ed global batch: the recipe's, unless train.target_accuracy
    (early_stop) ends it at the first epoch every seed of the basis reached the target."""
    return (expected["epochs_to_target"] or expected["epochs"]) if early_stop else expected["epochs"]


def warning(points: list[dict], global_batch: int, recipe: str, target: float) -> str | None:
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
                f"below its target {target:.1%} (docs/scaling.md)")
    return None


def launch_check(cfg: dict, global_batch: int) -> dict:
    """For the job log and the report at start: where this global batch lies in the run's own recipe's
    basis, what accuracy it measured there against the run's target, and the warning line if any."""
    basis = for_config(cfg)
    target = target_of(cfg, basis)
    if basis is None:
        return {"basis": None, "recipe": None, "target": target, "within": None, "expected_accuracy": None,
                "epochs": None, "note": missing_line(cfg), "warning": None}
    points = recipe_points(basis)
    e = expect(points, global_batch, target)
    lo, hi = e["measured"]
    note = None if e["within"] else (f"global batch {global_batch} is outside the accuracy basis ({basis['recipe']} "
                                     f"recipe, global batch {lo}–{hi}): not measured")
    return {"basis": f"{basis['recipe']} recipe, global batch {lo}–{hi}", "recipe": basis["recipe"], "target": target,
            "within": e["within"], "expected_accuracy": e["accuracy_mean"], "epochs": e.get("epochs"), "note": note,
            "warning": warning(points, global_batch, basis["recipe"], target)}
