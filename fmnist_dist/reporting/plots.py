"""PNG plots of a run and of a comparison (matplotlib, Agg backend: no display needed).

Per run (written by rank 0 at the end of training into the run directory, and again by
`report RUN_DIR --plots DIR`):
  accuracy_loss.png   accuracy and loss per epoch: training, validation, and the final test value
  throughput.png      images/s per epoch: per rank, and the whole job
  time_breakdown.png  where the time went, per rank (stacked seconds: start-up, data, compute,
                      communication, wait, framework overhead, evaluation, checkpointing)
Per comparison (`report RUN_DIR RUN_DIR ... --plots DIR`):
  scaling.png         speedup vs ranks for each config, with the ideal (linear) line, efficiency
                      printed at each point, and projected points when a projection is given
  comparison_breakdown.png  share of each rank's time per category, one bar per run
Every figure is FIGSIZE inches at DPI dots per inch, i.e. 800 x 450 pixels.
"""
from __future__ import annotations

import os
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..errors import ReportWriteError, cause  # noqa: E402
from ..files import TMP_PREFIX, unlink_quietly  # noqa: E402
from ..timing.breakdown import CATEGORIES, CATEGORY_LABELS, breakdown_rows  # noqa: E402
from .report import rank_throughput  # noqa: E402
from .schema import Epoch, Report  # noqa: E402

FIGSIZE = (8.0, 4.5)
DPI = 100
PIXELS = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))
RUN_PLOTS = ("accuracy_loss.png", "throughput.png", "time_breakdown.png")
COMPARISON_PLOTS = ("scaling.png", "comparison_breakdown.png")
COLORS = {
    "startup_s": "#9e9e9e", "data_s": "#8c564b", "compute_s": "#1f77b4", "comm_s": "#d62728",
    "wait_s": "#ff7f0e", "other_s": "#bcbd22", "eval_s": "#2ca02c", "checkpoint_s": "#9467bd",
}


def _figure(ncols: int = 1):
    fig, axes = plt.subplots(1, ncols, figsize=FIGSIZE, dpi=DPI, layout="constrained")
    return fig, axes


def _save(fig, path: str) -> str:
    """The figure as a PNG, whole or not at all (temporary file, then rename); ReportWriteError
    names the file that could not be written."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=TMP_PREFIX, suffix=".png")
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)            # as readable as a file savefig creates
            fig.savefig(f, dpi=DPI, format="png")  # no bbox_inches="tight": the size stays PIXELS
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise ReportWriteError(f"{path}: could not write the plot: {cause(e)}") from None
    finally:
        plt.close(fig)
        if tmp is not None:
            unlink_quietly(tmp)
    return path


def _make_dir(out_dir: str) -> None:
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ReportWriteError(f"{out_dir}: cannot hold the plots: {cause(e)}") from None


def _title(report: Report) -> str:
    w = report["world"]
    hosts = len(w["hosts"])
    return (f"{report['run_id']} · {w['size']} rank{'s' if w['size'] != 1 else ''} on {hosts} "
            f"host{'s' if hosts != 1 else ''} · {report['status']}")


def plot_run(report: Report, out_dir: str) -> list[str]:
    """The three per-run plots; returns their paths (none for a run without epochs)."""
    if not report.get("epochs"):
        return []
    _make_dir(out_dir)
    return [accuracy_loss(report, os.path.join(out_dir, RUN_PLOTS[0])),
            throughput(report, os.path.join(out_dir, RUN_PLOTS[1])),
            time_breakdown(report, os.path.join(out_dir, RUN_PLOTS[2]))]


def accuracy_loss(report: Report, path: str) -> str:
    epochs = report["epochs"]
    x = [e["epoch"] for e in epochs]
    res = report.get("results") or {}
    fig, (acc, loss) = _figure(2)
    for ax, key, scale, unit in ((acc, "accuracy", 100.0, "accuracy (%)"), (loss, "loss", 1.0, "cross-entropy loss")):
        ax.plot(x, [scale * e[f"train_{key}"] for e in epochs], "o-", label="training (running mean over the epoch)")
        ax.plot(x, [scale * e[f"val_{key}"] for e in epochs], "s-", label="validation (end of epoch)")
        if res.get(f"test_{key}") is not None:
            ax.plot([x[-1]], [scale * res[f"test_{key}"]], "*", markersize=14, color="black",
                    label=f"test (final): {scale * res[f'test_{key}']:.2f}{'%' if scale == 100 else ''}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(unit)
        ax.set_xticks(x if len(x) <= 15 else ax.get_xticks())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    acc.set_title("accuracy per epoch", fontsize=10)
    loss.set_title("loss per epoch", fontsize=10)
    fig.suptitle(_title(report), fontsize=10)
    return _save(fig, path)


def rank_series(epochs: list[Epoch]) -> dict[int, list[float]]:
    """Each rank's images/s per epoch (report.rank_throughput); NaN, a gap in the line, for an epoch
    the rank has no record of."""
    series: dict[int, list[float]] = {}
    for rank in sorted({r["rank"] for e in epochs for r in e["ranks"]}):
        records = [next((r for r in e["ranks"] if r["rank"] == rank), None) for e in epochs]
        series[rank] = [rank_throughput([r]) if r else float("nan") for r in records]
    return series


def throughput(report: Report, path: str) -> str:
    epochs = report["epochs"]
    x = [e["epoch"] for e in epochs]
    fig, (per_rank, job) = _figure(2)
    for rank, ys in rank_series(epochs).items():
        per_rank.plot(x, ys, "o-", label=f"rank {rank}")
    per_rank.set_title("per rank: images ÷ (data + fit) seconds", fontsize=10)
    job.plot(x, [e["images_per_s"] for e in epochs], "o-", color="black", label="all ranks")
    job.set_title("whole job: images ÷ epoch training time", fontsize=10)
    for ax in (per_rank, job):
        ax.set_xlabel("epoch (epoch 1 includes graph tracing)")
        ax.set_ylabel("images/s")
        ax.set_xticks(x if len(x) <= 15 else ax.get_xticks())
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=1 if len(epochs[0]["ranks"]) <= 8 else 2)
    fig.suptitle("training throughput · " + _title(report), fontsize=10)
    return _save(fig, path)


def time_breakdown(report: Report, path: str) -> str:
    rows = breakdown_rows(report)
    method = (report.get("breakdown") or {}).get("method", "no split recorded")
    fig, ax = _figure(1)
    labels = [f"rank {r['rank']}\n{r['host']}" if len(rows) <= 8 else str(r["rank"]) for r in rows]
    _stacked(ax, labels, [[r.get(c, 0.0) for c in CATEGORIES] for r in rows])
    ax.set_ylabel("seconds (summed over epochs)")
    ax.set_xlabel("rank" + ("" if len(rows) <= 8 else " (host in report.md)"))
    ax.set_title(f"where the time went · compute/communication split: {method}", fontsize=10)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, reverse=True)
    fig.suptitle(_title(report), fontsize=10)
    return _save(fig, path)


def _stacked(ax, labels: list[str], values: list[list[float]], horizontal: bool = False) -> None:
    bottoms = [0.0] * len(labels)
    for i, c in enumerate(CATEGORIES):
        heights = [v[i] for v in values]
        if not any(heights):
            continue
        draw = ax.barh if horizontal else ax.bar
        kw = {"left": bottoms} if horizontal else {"bottom": bottoms}
        draw(labels, heights, color=COLORS[c], label=CATEGORY_LABELS[c], **kw)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    (ax.xaxis if horizontal else ax.yaxis).grid(alpha=0.3)


def plot_comparison(rows: list[dict], reports: dict[str, Report], out_dir: str,
                    projections: list[dict] | None = None) -> list[str]:
    """rows: compare.compare_rows output; reports: path -> report. Returns the paths written."""
    _make_dir(out_dir)
    return [scaling(rows, os.path.join(out_dir, COMPARISON_PLOTS[0]), projections),
            comparison_breakdown(rows, reports, os.path.join(out_dir, COMPARISON_PLOTS[1]))]


def scaling(rows: list[dict], path: str, projections: list[dict] | None = None) -> str:
    fig, ax = _figure(1)
    groups: dict[str, list[dict]] = {}
    several = len({r.get("series") for r in rows if r.get("speedup") is not None}) > 1
    for r in rows:
        if r.get("speedup") is not None:   # one curve per recipe and series (CPU ISA, precision, Intel software)
            groups.setdefault(f"{r['recipe']} [{r['series']}]" if several else r["recipe"], []).append(r)
    max_ranks = 1
    for name, members in sorted(groups.items()):
        members = sorted(members, key=lambda r: r["ranks"])
        xs, ys = [m["ranks"] for m in members], [m["speedup"] for m in members]
        line, = ax.plot(xs, ys, "o-", label=f"{name} (measured)")
        for m in members:
            ax.annotate(f"{100 * m['efficiency']:.0f}%", (m["ranks"], m["speedup"]), textcoords="offset points",
                        xytext=(6, -12), fontsize=8, color=line.get_color())
        max_ranks = max(max_ranks, *xs)
    for proj in projections or []:
        pts = [p for p in proj["rows"] if p.get("speedup") is not None]
        if pts:
            ax.plot([p["ranks"] for p in pts], [p["speedup"] for p in pts], "^:",
                    label=f"{proj['recipe']} (projected)")
            max_ranks = max(max_ranks, *[p["ranks"] for p in pts])
    base = min((r["baseline_ranks"] for r in rows if r.get("baseline_ranks")), default=1)
    ideal_x = sorted({base, max_ranks} | {r["ranks"] for r in rows if r.get("ranks")})
    ax.plot(ideal_x, [x / base for x in ideal_x], "--", color="gray", label="ideal (linear)")
    if max_ranks / base > 8:
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("ranks")
    ax.set_ylabel(f"speedup in images/s over {base} rank{'s' if base != 1 else ''}")
    ax.set_title("scaling: speedup vs ranks (labels: parallel efficiency)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def comparison_breakdown(rows: list[dict], reports: dict[str, Report], path: str) -> str:
    fig, ax = _figure(1)
    labels, values = [], []
    for r in rows:
        report = reports.get(r["path"])
        if report is None or not report.get("epochs"):
            continue
        totals = [sum(x.get(c, 0.0) for x in breakdown_rows(report)) for c in CATEGORIES]
        whole = sum(totals)
        labels.append(f"{r['run']}\n{r['ranks']} rank{'s' if r['ranks'] != 1 else ''} · {r['status']}")
        values.append([100 * t / whole if whole > 0 else 0.0 for t in totals])
    _stacked(ax, labels[::-1], values[::-1], horizontal=True)
    ax.set_xlabel("share of the ranks' time (%)")
    ax.set_xlim(0, 100)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title("where the time went, per run (all ranks together)", fontsize=10)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    return _save(fig, path)
