"""Comparing runs: `report RUN_DIR RUN_DIR ...` (or a glob such as `runs/*`).

One row per run directory, whatever its state: completed, running (or killed while running),
failed, preempted, or unreadable (no report, corrupt, another schema version: the reason is
shown). Speedup and parallel efficiency are computed within a *recipe*: runs whose resolved
configs are equal once the experiment-neutral keys are left out (config.EXPERIMENT_NEUTRAL: thread
counts, affinity, data location, time limits, report options). The baseline of a recipe is its smallest world size among its
completed runs (among all its runs with a finished epoch when none completed); with several runs of
that size, the mean of their images/s.

  speedup    = images/s of the run / images/s of the baseline
  efficiency = speedup / (ranks / baseline ranks)

images/s is the run's own (all ranks' training images / training time, epoch 1 with its tracing
included), as in its report. Formats: text (terminal table), md, csv, json; json holds the same
rows and round-trips through `rows_from_json`.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import os
from typing import Any

from .. import config as config_mod
from ..tables import table
from ..timing.breakdown import breakdown_rows
from .render import precision_label
from . import projection
from . import report as report_mod

COMPARISON_SCHEMA = "fmnist-dist/comparison"
COMPARISON_VERSION = 1
# (key, heading, format for text/md); csv and json carry the raw values.
COLUMNS = (
    ("run", "run", "{}"), ("status", "status", "{}"), ("recipe", "recipe", "{}"),
    ("ranks", "ranks", "{}"), ("hosts", "hosts", "{}"), ("threads", "thr/rank", "{}"),
    ("epochs", "epochs", "{}"), ("training_s", "train s", "{:.1f}"),
    ("time_to_target_s", "to target s", "{:.1f}"), ("test_accuracy", "test acc", "{:.2%}"),
    ("images_per_s", "images/s", "{:.0f}"), ("speedup", "speedup", "{:.2f}x"),
    ("efficiency", "efficiency", "{:.0%}"), ("comm_share", "comm", "{:.0%}"),
    ("split_method", "split", "{}"), ("precision", "precision", "{}"), ("itex", "ITEX", "{}"),
    ("onednn", "oneDNN", "{}"), ("isa", "ISA", "{}"),
)
EXTRA_FIELDS = ("path", "error", "recipe_key", "series", "baseline_runs", "baseline_ranks", "baseline_images_per_s")


def expand(paths: list[str]) -> list[str]:
    """Arguments as given, a glob (when the shell did not expand it) replaced by its matches that
    are run directories or report files."""
    out: list[str] = []
    for p in paths:
        if not os.path.exists(p) and glob.has_magic(p):
            matches = sorted(m for m in glob.glob(p)
                             if os.path.isdir(m) or os.path.basename(m) == "report.json")
            out.extend(matches or [p])
        else:
            out.append(p)
    seen, unique = set(), []
    for p in out:
        key = os.path.abspath(p[: -len("report.json")] if p.endswith("report.json") else p).rstrip("/")
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def load_all(paths: list[str]) -> list[tuple[str, dict | None, str | None]]:
    """(path, report or None, error or None) per run directory, in the order given."""
    out = []
    for p in paths:
        try:
            out.append((p, report_mod.load_report(p), None))
        except report_mod.ReportError as e:
            out.append((p, None, str(e)))
    return out


def recipe_key(config: dict) -> str:
    """A short hash of the config minus the experiment-neutral keys: equal for runs of the same recipe."""
    return config_mod.experiment_key(config)


def config_name(report: dict) -> str:
    """The --config file's name as the run was started, else 'default' (the schema's defaults are the default recipe)."""
    argv = (report.get("environment") or {}).get("argv") or []
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            return os.path.splitext(os.path.basename(argv[i + 1]))[0]
        if a.startswith("--config="):
            return os.path.splitext(os.path.basename(a.split("=", 1)[1]))[0]
    return "default"


def row_for(path: str, report: dict | None, error: str | None) -> dict:
    row: dict[str, Any] = {c[0]: None for c in COLUMNS}
    row.update({f: None for f in EXTRA_FIELDS})
    row["path"] = path
    row["run"] = os.path.basename(os.path.normpath(path[: -len("report.json")] if path.endswith("report.json") else path))
    if report is None:
        row.update(status="unreadable", error=error)
        return row
    env, w, t, res = report.get("environment") or {}, report["world"], report.get("timing") or {}, report.get("results") or {}
    rows = breakdown_rows(report)
    total = sum(r.get("total_s", 0.0) for r in rows)
    comm = sum(r.get("comm_s", 0.0) for r in rows)
    row.update(
        run=report.get("run_id") or row["run"], status=report.get("status"), error=report.get("error"),
        recipe=config_name(report), recipe_key=recipe_key(report.get("config") or {}),
        ranks=w["size"], hosts=len(w["hosts"]), threads=env.get("intra_op_threads"),
        epochs=len(report.get("epochs") or []), training_s=t.get("training_s"),
        time_to_target_s=t.get("time_to_target_s"), test_accuracy=res.get("test_accuracy"),
        images_per_s=t.get("images_per_s") or None,
        comm_share=(comm / total if total > 0 else None) if report.get("epochs") else None,
        split_method=(report.get("breakdown") or {}).get("method"),
        precision=precision_label(env), itex="on" if (env.get("itex") or {}).get("loaded") else "off",
        onednn="on" if env.get("onednn_enabled") else "off",
        isa="/".join(sorted(set(((env.get("precision") or {}).get("hosts") or {}).values()))) or None,
    )
    # One scaling series: one recipe on one kind of CPU, in one precision, with the same Intel
    # software; runs that differ in these are side by side, never points of one curve.
    row["series"] = f"{row['isa'] or 'ISA unknown'} · {row['precision']} · ITEX {row['itex']} · oneDNN {row['onednn']}"
    return row


def compare_rows(loaded: list[tuple[str, dict | None, str | None]]) -> list[dict]:
    rows = [row_for(*item) for item in loaded]
    # names: the config file's name, qualified with the recipe hash when one name covers several recipes
    keys_by_name: dict[str, set] = {}
    for r in rows:
        if r["recipe_key"]:
            keys_by_name.setdefault(r["recipe"], set()).add(r["recipe_key"])
    for r in rows:
        if r["recipe_key"] and len(keys_by_name[r["recipe"]]) > 1:
            r["recipe"] = f"{r['recipe']}@{r['recipe_key'][:6]}"
    for key in {(r["recipe_key"], r["series"]) for r in rows if r["recipe_key"]}:
        members = [r for r in rows if (r["recipe_key"], r["series"]) == key and r["images_per_s"]]
        pool = [r for r in members if r["status"] == "completed"] or members
        if not pool:
            continue
        smallest = min(r["ranks"] for r in pool)
        base = [r for r in pool if r["ranks"] == smallest]
        base_ips = sum(r["images_per_s"] for r in base) / len(base)
        for r in members:
            r["baseline_runs"] = [b["run"] for b in base]
            r["baseline_ranks"] = smallest
            r["baseline_images_per_s"] = base_ips
            r["speedup"] = r["images_per_s"] / base_ips
            r["efficiency"] = r["speedup"] / (r["ranks"] / smallest)
    return rows


def notes(rows: list[dict]) -> list[str]:
    out = ["speedup = images/s ÷ the baseline's images/s (same recipe and series — CPU ISA, precision, ITEX, "
           "oneDNN —, smallest world size, completed runs); "
           "efficiency = speedup ÷ (ranks ÷ baseline ranks); comm = communication's share of the ranks' time "
           "(split: how it was measured — timeline, probe estimate, or single rank)"]
    for key, series in sorted({(r["recipe_key"], r["series"]) for r in rows if r["recipe_key"]}):
        members = [r for r in rows if (r["recipe_key"], r["series"]) == (key, series)]
        b = next((r for r in members if r["baseline_runs"]), None)
        if b:
            out.append(f"recipe {b['recipe']} (config {key}), {series}: baseline {', '.join(b['baseline_runs'])} "
                       f"({b['baseline_ranks']} rank{'s' if b['baseline_ranks'] != 1 else ''}, "
                       f"{b['baseline_images_per_s']:.0f} images/s)")
        else:
            out.append(f"recipe {members[0]['recipe']} (config {key}), {series}: no finished epoch, no baseline")
    for r in rows:
        if r["status"] == "unreadable":
            out.append(f"{r['run']}: not read: {r['error']}")
        elif r["status"] != "completed":
            out.append(f"{r['run']}: {r['status']}" + (f" ({r['error']})" if r.get("error") else "")
                       + (f"; numbers cover its {r['epochs']} finished epoch{'s' if r['epochs'] != 1 else ''}"
                          if r["epochs"] else "; no finished epoch"))
    return out


def _cell(row: dict, key: str, spec: str) -> str:
    v = row.get(key)
    if v is None:
        return "—"
    return spec.format(v)


def render(rows: list[dict], fmt: str = "text") -> str:
    if fmt == "json":
        return json.dumps({"schema": COMPARISON_SCHEMA, "schema_version": COMPARISON_VERSION,
                           "columns": [c[0] for c in COLUMNS], "rows": rows, "notes": notes(rows)}, indent=2)
    if fmt == "csv":
        out = io.StringIO()
        fields = [c[0] for c in COLUMNS] + list(EXTRA_FIELDS)
        writer = csv.writer(out)
        writer.writerow(fields)
        for r in rows:
            writer.writerow(["" if r.get(f) is None else (";".join(r[f]) if isinstance(r[f], list) else r[f])
                             for f in fields])
        return out.getvalue().rstrip("\n")
    head = [c[1] for c in COLUMNS]
    cells = [[_cell(r, k, spec) for k, _, spec in COLUMNS] for r in rows]
    left = {i for i, c in enumerate(COLUMNS) if c[0] in ("run", "status", "recipe", "split_method", "precision")}
    bullet = "-" if fmt == "md" else "*"
    return "\n".join(table(head, cells, fmt, left) + [""] + [f"{bullet} {n}" for n in notes(rows)])


def seed_summary(loaded: list[tuple[str, dict | None, str | None]], fmt: str = "text") -> str:
    """Completed runs grouped by recipe with train.seed left out: test accuracy mean, spread and
    range, mean training time and images/s, the seeds. For the README's results table."""
    import statistics

    groups: dict[tuple, list[dict]] = {}
    for path, report, _ in loaded:
        if report is None or report.get("status") != "completed":
            continue
        cfg = json.loads(json.dumps(report.get("config") or {}))
        seed = cfg.get("train", {}).pop("seed", None)
        row = row_for(path, report, None)
        res = report.get("results") or {}
        several_views = res.get("eval_flip") or res.get("eval_shift")
        one_view = res.get("test_accuracy_one_view") if several_views else res.get("test_accuracy")
        cpu = cpu_label(report.get("environment") or {})
        groups.setdefault((config_name(report), recipe_key(cfg), row["ranks"], cpu, row["precision"]), []).append(
            {**row, "seed": seed, "one_view": one_view})
    head = ["recipe", "CPU (ISA)", "precision", "ranks", "epochs", "seeds", "test acc mean", "± sd", "min–max",
            "one view", "train s", "images/s"]
    lines = []
    for (name, _, ranks, cpu, precision), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][3:], kv[0][2])):
        acc = [r["test_accuracy"] for r in runs]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        lines.append([name, cpu, precision, str(ranks), "/".join(sorted({str(r["epochs"]) for r in runs})),
                      ",".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"] or 0)),
                      f"{statistics.mean(acc):.2%}", f"{sd:.2%}", f"{min(acc):.2%}–{max(acc):.2%}",
                      _mean_pct([r["one_view"] for r in runs]),
                      f"{statistics.mean(r['training_s'] for r in runs):.1f}",
                      f"{statistics.mean(r['images_per_s'] for r in runs):.0f}"])
    return "\n".join(table(head, lines, fmt))


def cpu_label(env: dict) -> str:
    """'AMD EPYC (AVX2, ONEDNN_MAX_CPU_ISA=AVX2)': each distinct CPU of the run as the kernels saw it."""
    from .. import cpu

    nodes = env.get("nodes") or [{"cpu_model": env.get("cpu_model", "?"), "isa_cap": None,
                                  "isa": cpu.ISA_NAMES.get(cpu.cpu_level(env.get("cpu_flags") or []), "?")}]
    labels = {f"{n['cpu_model']} ({n['isa']}" + (f", {n['isa_cap']})" if n.get("isa_cap") else ")") for n in nodes}
    return " + ".join(sorted(labels))


def _mean_pct(values: list) -> str:
    """Mean as a percentage; a dash when a run lacks the value."""
    import statistics

    return "—" if None in values else f"{statistics.mean(values):.2%}"


def rows_from_json(text: str) -> list[dict]:
    data = json.loads(text)
    if data.get("schema") != COMPARISON_SCHEMA or data.get("schema_version") != COMPARISON_VERSION:
        raise report_mod.ReportError(f"not an fmnist-dist comparison of version {COMPARISON_VERSION}")
    return data["rows"]


def projections(loaded: list[tuple[str, dict | None, str | None]], rows: list[dict], nodes, ranks_per_node=None,
                latency_s=None, bandwidth_Bps=None, latency_model="ring",
                accuracy=None, network: str = "25gbe") -> tuple[list[dict], list[dict], list[str]]:
    """Per recipe: a projection from its smallest completed run (communication from its largest
    multi-rank run), and a validation of every larger measured run. `accuracy(report)` gives a run's
    accuracy basis and target (or None). Returns (projections, validations, problems)."""
    reports = {p: r for p, r, _ in loaded if r is not None}
    projs, vals, problems = [], [], []
    for key in sorted({(r["recipe_key"], r["series"]) for r in rows if r["recipe_key"]}):
        members = [r for r in rows if (r["recipe_key"], r["series"]) == key and r["status"] == "completed" and r["epochs"]]
        if not members:
            continue
        members.sort(key=lambda r: (r["ranks"], -(r["images_per_s"] or 0)))
        base = members[0]
        multi = [r for r in members if r["ranks"] > 1]
        # communication from the largest multi-rank run, preferring one measured with the timeline
        comm_src = max(multi, key=lambda r: (r["ranks"], r["split_method"] == "timeline")) if multi else None
        try:
            proj = projection.project(reports[base["path"]], reports[comm_src["path"]] if comm_src else None,
                                      nodes=nodes, ranks_per_node=ranks_per_node, latency_s=latency_s,
                                      bandwidth_Bps=bandwidth_Bps, latency_model=latency_model,
                                      accuracy=accuracy(reports[base["path"]]) if accuracy else None, network=network)
            proj["recipe"] = base["recipe"]
            projs.append(proj)
        except projection.ProjectionError as e:
            problems.append(f"recipe {base['recipe']}: {e}")
        for target in members[1:]:
            if target["ranks"] > base["ranks"]:
                try:
                    vals.append(projection.validate(reports[base["path"]], reports[target["path"]], latency_model))
                except projection.ProjectionError as e:
                    problems.append(f"validation {base['run']} -> {target['run']}: {e}")
    return projs, vals, problems


# --------------------------------------------------------------------------------------------
# The `report` subcommand (its arguments and its command; __main__ wires them in)
