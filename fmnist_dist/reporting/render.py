"""Reports for people: the summary printed at the end, report.md, and the time breakdown's tables."""
from __future__ import annotations

from ..scaling import split_words
from ..timing.breakdown import CATEGORIES, CATEGORY_LABELS, breakdown_rows
from .schema import Report

RANK_COLUMNS = ("data_s", "step_s", "fit_s", "wait_s", "eval_s", "samples")


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def _secs(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f} s"


def batch_label(data: dict) -> str:
    """'global batch 8192 (256/rank, weak scaling)', and the simulated ranks if any."""
    if "global_batch_size" not in data:
        return f"batch {data['batch_size_per_rank']}/rank"
    scaling = data.get("scaling") or {"mode": "weak"}       # reports before strong scaling existed
    words = f"{scaling['mode']} scaling"
    if scaling.get("lr_factor"):     # a fixed global batch on fewer ranks than train.batch_size was meant for
        reference = round(data["global_batch_size"] / scaling["lr_factor"])
        if data["batch_size_per_rank"] > reference:
            words = split_words(data["batch_size_per_rank"], reference)
    label = f"global batch {data['global_batch_size']} ({data['batch_size_per_rank']}/rank, {words}"
    if scaling.get("simulated"):
        label += f", {scaling['world_size']} ranks simulated on {scaling['processes']}"
    if scaling.get("recipe") == "large-batch":
        label += f", large-batch recipe: {scaling['optimizer']}, {scaling['warmup_epochs']:g}-epoch warm-up"
    return label + ")"


def threads_label(env: dict) -> str:
    """A rank's threads: inside each op, and how many ops (simulated ranks' towers) run side by side."""
    intra, inter = env.get("intra_op_threads"), env.get("inter_op_threads") or 1
    if inter == 1 or not isinstance(intra, int):
        return f"{intra} threads/rank"
    return f"{intra * inter} threads/rank ({inter} ops side by side, {intra} thread{'s' if intra != 1 else ''} each)"


def summary_lines(report: Report) -> list[str]:
    """The short end-of-run summary printed by rank 0 and by `report RUN_DIR`."""
    t, res, w, env = report["timing"], report.get("results", {}), report["world"], report["environment"]
    hosts = len(w["hosts"])
    prec = precision_label(env)
    lines = [
        f"fmnist-dist run {report['run_id']}: {report['status']}" + (f" ({report['error']})" if report.get("error") else ""),
        f"  ranks {w['size']} on {hosts} host{'s' if hosts != 1 else ''} · {threads_label(env)}"
        f" · epochs {len(report['epochs'])} · {batch_label(report['data'])} · {prec}"
        f" · ITEX {'on' if env.get('itex', {}).get('loaded') else 'off'}"
        f" · oneDNN {'on' if env.get('onednn_enabled') else 'off'}",
        f"  training time {_secs(t.get('training_s'))} · {t.get('images_per_s', 0):.0f} images/s"
        f" · test accuracy {_pct(res.get('test_accuracy'))}"
        + (f" ({res['test_correct']}/{res['test_total']})" if res.get("test_total") else "")
        + f" · validation {_pct(res.get('val_accuracy'))}",
    ]
    choice = (report["data"].get("scaling") or {}).get("choice")
    if choice:
        lines.append(f"  global batch (auto): {choice['reason']}")
    scale_warning = ((report["data"].get("scaling") or {}).get("accuracy_basis") or {}).get("warning")
    if scale_warning:
        lines.append(f"  warning: {scale_warning}")
    if res.get("eval_flip") or res.get("eval_shift"):
        views = (["each image and its mirror image (train.eval_flip)"] if res.get("eval_flip") else ["each image"])
        if res.get("eval_shift"):
            views.append(f"each moved by up to {res['eval_shift']} pixel(s) (train.eval_shift)")
        lines.append(f"  evaluated on {', '.join(views)}; the images alone: "
                     f"test accuracy {_pct(res.get('test_accuracy_one_view'))}")
    if res.get("target_accuracy") is not None:
        lines.append(f"  target {_pct(res['target_accuracy'])}: "
                     + (f"reached in {_secs(t['time_to_target_s'])} (epoch {res['target_reached_epoch']})"
                        if t.get("time_to_target_s") is not None else "not reached"))
    decision = (report.get("environment") or {}).get("precision")
    if decision:
        lines.append(f"  precision: {decision['reason']}")
    share = share_line(report)
    if share:
        lines.append(share)
    return lines


def precision_label(env: dict) -> str:
    """The precision the kernels really ran in (from the state TensorFlow and ITEX were in)."""
    if env.get("itex_auto_mixed_precision"):
        return "bf16 (ITEX AMP)"
    policy = env.get("mixed_precision_policy") or "float32"
    return "bf16 (Keras)" if "bfloat16" in policy else {"float32": "fp32"}.get(policy, policy)


def precision_lines(report: Report) -> list[str]:
    """Why this precision: the decision and each host's CPU as the decision saw it."""
    env = report.get("environment") or {}
    decision = env.get("precision")
    if not decision:
        return []
    lines = [f"precision {precision_label(env)}: {decision['reason']} (intel.mixed_precision={decision['requested']})"]
    seen = set()
    for node in env.get("nodes") or []:
        if node["host"] not in seen:
            seen.add(node["host"])
            cap = f", {node['isa_cap']}" if node.get("isa_cap") else ""
            lines.append(f"  {node['host']}: {node['cpu_model']}, {node['isa']}{cap} "
                         f"(flags {' '.join(node['flags']) or 'none of note'})")
    return lines


def choice_lines(report: Report) -> list[str]:
    """train.global_batch_size=auto: each global batch weighed, and why it was taken or not."""
    choice = (report["data"].get("scaling") or {}).get("choice")
    if not choice:
        return []
    lines = [choice["reason"]]
    if choice["candidates"]:
        lines += ["", f"{'global batch':>12} {'per rank':>8} {'expected acc':>12} {'epochs':>6} {'projected s':>11}  verdict"]
    for c in choice["candidates"]:
        acc = _pct(c["expected_accuracy"]) if c.get("expected_accuracy") is not None else "unmeasured"
        projected = f"{c['projected_s']:.0f}" if c.get("projected_s") is not None else "—"
        lines.append(f"{c['global_batch']:>12} {c['per_rank']:>8} {acc:>12} {c.get('epochs') or '—':>6} {projected:>11}  "
                     + (c.get("rejected") or "chosen"))
    return lines


def _section(title: str, lines: list[str]) -> list[str]:
    return [f"## {title}", "", *[f"    {line}" for line in lines], ""] if lines else []


def _preflight_lines(report: Report) -> list[str]:
    record = report.get("preflight")
    if not record:
        return []
    from ..preflight import table

    return [f"checked {record['checked']} in {record['seconds']:.1f} s; clock skew up to "
            f"{1000 * record['clock_skew_s']:.1f} ms", *table(record["ranks"], record["clock_offsets_s"])]


def render_markdown(report: Report) -> str:
    t, w = report["timing"], report["world"]
    lines = [f"# fmnist-dist run `{report['run_id']}`", "", *[f"    {s.strip()}" for s in summary_lines(report)], "",
             f"Start-up {_secs(t.get('startup_s'))}, data loading {_secs(t.get('data_load_s'))}, "
             f"training {_secs(t.get('training_s'))}, evaluation {_secs(t.get('evaluation_s'))}, "
             f"total {_secs(t.get('total_s'))}. Rank imbalance {100 * t.get('imbalance', 0):.1f}% "
             f"(slowest rank's busy time over the mean). Model: {report['model']['description']} "
             f"({report['model']['parameters']:,} parameters, batch norm "
             f"{'yes' if report['model']['batch_norm'] else 'no'}).", "",
             *_section("Precision and CPUs", precision_lines(report)),
             *_section("Global batch (train.global_batch_size: auto)", choice_lines(report)),
             *_section("Preflight", _preflight_lines(report)),
             "## Epochs", "",
             "| epoch | lr | train loss | train acc | val loss | val acc | training s | eval s | images/s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in report["epochs"]:
        lines.append(f"| {e['epoch']} | {e['lr']:.2e} | {e['train_loss']:.4f} | {_pct(e['train_accuracy'])} | "
                     f"{e['val_loss']:.4f} | {_pct(e['val_accuracy'])} | {e['training_s']:.2f} | "
                     f"{e['evaluation_s']:.2f} | {e['images_per_s']:.0f} |")
    lines += ["", "## Ranks (totals over epochs)", "",
              "| rank | host | threads | samples | data s | step s | fit s | wait s | eval s | images/s |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for rank in w["ranks"]:
        rows = [r for e in report["epochs"] for r in e["ranks"] if r["rank"] == rank["rank"]]
        total = {c: sum(r[c] for r in rows) for c in RANK_COLUMNS}
        ips = t.get("images_per_s_per_rank", {}).get(str(rank["rank"]), 0.0)   # none before epoch 1 ends
        lines.append(f"| {rank['rank']} | {rank['host']} | {rank['threads']} | {total['samples']} | "
                     f"{total['data_s']:.2f} | {total['step_s']:.2f} | {total['fit_s']:.2f} | "
                     f"{total['wait_s']:.2f} | {total['eval_s']:.2f} | {ips:.0f} |")
    lines += ["", "data s: building the epoch's shard; step s: inside training steps (compute and allreduce); "
              "fit s: the whole Keras fit call; wait s: waiting for the slowest rank at the epoch's end.", ""]
    lines += breakdown_lines(report)
    return "\n".join(lines)


def breakdown_lines(report: Report) -> list[str]:
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
              "tracing in the first step, callbacks, creating and tearing down the data iterator); evaluation: "
              "validation each epoch; checkpointing: writing checkpoints.", ""]
    return lines


def share_line(report: Report) -> str | None:
    """One summary line: the shares of the time summed over ranks."""
    rows = breakdown_rows(report)
    total = sum(row.get("total_s", 0.0) for row in rows)
    if total <= 0:
        return None
    parts = [f"{CATEGORY_LABELS[c]} {100 * sum(row.get(c, 0.0) for row in rows) / total:.0f}%"
             for c in CATEGORIES if sum(row.get(c, 0.0) for row in rows) > 0]
    method = (report.get("breakdown") or {}).get("method", "no split")
    return "  time: " + " · ".join(parts) + f" (method: {method})"
