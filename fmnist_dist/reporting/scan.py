"""A scan: completed runs of one recipe at several global batches (simulated ranks, see
fmnist_dist.scaling) and seeds, grouped into points (recipe, global batch, epochs) with the final test
accuracies and each seed's validation accuracy per epoch. `report RUNS --scan` prints the table;
`--format json` writes the points, the stuff of an accuracy basis (fmnist_dist.basis).
"""
from __future__ import annotations

import json

from .. import basis
from ..tables import table
from .compare import config_name


def scan_points(loaded: list[tuple[str, dict | None, str | None]]) -> list[dict]:
    """Completed runs grouped by (recipe, global batch, epochs), the seed left out."""
    groups: dict[tuple, list[dict]] = {}
    for _, report, _ in loaded:
        if report is None or report.get("status") != "completed":
            continue
        cfg = json.loads(json.dumps(report.get("config") or {}))
        train = cfg.get("train", {})
        seed = train.get("seed")
        for key in basis.SCAN_KEYS:
            train.pop(key.split(".", 1)[1], None)
        # The recipe is the config as given; what the global batch made of it (the large-batch recipe,
        # chosen by the job) belongs to the point. Older reports: train as given.
        made = {k: v for k, v in (report["data"].get("scaling") or {}).items()
                if k in ("recipe", "optimizer", "warmup_epochs")}
        key = (config_name(report), basis.basis_key(cfg), report["data"]["global_batch_size"], len(report["epochs"]),
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


def render(points: list[dict], target: float, fmt: str = "text") -> str:
    """The accuracy-vs-global-batch table."""
    head = ["recipe", "optimizer", "lr scaling", "warm-up epochs", "global batch", "epochs", "seeds",
            "test acc mean", "± sd", "min–max", f"epochs to {target:.1%} val"]
    rows = []
    for p in points:
        s = basis.point_summary(p, target)
        per_seed = s["epochs_to_target_per_seed"]
        rows.append([p["recipe"], str(p["optimizer"]), str(p["lr_scaling"]), f"{p['warmup_epochs']:g}",
                     str(p["global_batch"]), str(p["epochs"]),
                     ",".join(str(x) for x in p["seeds"]), f"{s['accuracy_mean']:.2%}", f"{s['accuracy_sd']:.2%}",
                     f"{s['accuracy_min']:.2%}–{s['accuracy_max']:.2%}",
                     "/".join("—" if x is None else str(x) for x in per_seed)])
    return "\n".join(table(head, rows, fmt, left=4))
