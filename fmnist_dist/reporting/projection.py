"""Projected scaling: what more nodes would buy, from a run's compute time per step and a measured
allreduce cost. A model, not a measurement; every assumption is printed with its numbers.

The model (weak scaling: every rank keeps its batch size, so the global batch grows with ranks):

  time per step(p)  = compute per step + communication per step(p)
  compute per step  = the slowest rank's (step time - communication) per step in the base run's
                      steady epochs (epoch 1 is left out when there are more: it holds tracing),
                      assumed unchanged with p (same threads per rank, same per-rank batch)
  communication(p)  = k * [ h(p) * latency_hop + 2(p-1)/p * gradient_bytes / link_bandwidth ]
                      ring allreduce: h(p) = 2(p-1) latency hops (`tree`: 2 ceil(log2 p)), and
                      each rank sends and receives 2(p-1)/p of the gradients
  latency_hop, link_bandwidth: from the allreduce probe's fit seconds = latency + bytes/bandwidth
                      measured on p0 ranks (latency = h(p0) latency_hop, 1/bandwidth =
                      2(p0-1)/p0 / link_bandwidth), or given (--latency-us, --bandwidth-gbs)
  k                 = calibration: the communication per step recorded in the comm-source run
                      (Horovod timeline, or the probe's grouped allreduce) / the fit's prediction
                      for p0 ranks: how much worse training's allreduce is than the isolated one
  steps per epoch(p)= floor(training images / (p * batch per rank)), capped by train.steps_per_epoch
  time per epoch(p) = steps(p) * time per step(p) + data input (scaled with steps) + a fixed
                      per-epoch rest (fit overhead, wait), both from the base run
  speedup(p) = images/s(p) / images/s(base); efficiency = speedup / (p / base ranks)

`validate(base, target)` projects a measured larger run from a smaller one (here: 1 rank -> 2
ranks, the communication taken from the target run, as one would take it from a probe on the
target machine) and compares with the measured time per epoch. It is *comparable* only when the
target's threads did not wait for a core much more than the base's (cpu_wait_share from the
scheduler, MAX_EXTRA_CPU_WAIT): on an oversubscribed node (2 ranks plus their Horovod/MPI threads
on 2 cores, or other jobs) the compute per step itself changes, which this model does not cover. The stated error is
ERROR_FLOOR (effects the model leaves out: ranks sharing a node's cores and memory bandwidth,
overlap of allreduce with back-propagation) plus the measurement noise seen in the base run
(the interquartile spread of its step times); the validation reports whether the measurement fell
inside it.
"""
from __future__ import annotations

import math
import statistics

from ..errors import ProjectionError

NODES = (1, 2, 4, 8, 16, 32, 64)
ERROR_FLOOR = 0.15
# A validation compares like with like only if the target's threads did not wait for a core much
# more than the base's (cpu_wait_share, from the scheduler): else the node was oversubscribed.
MAX_EXTRA_CPU_WAIT = 0.15



def steady_epochs(report: dict) -> list[dict]:
    epochs = report.get("epochs") or []
    return epochs[1:] if len(epochs) > 1 else epochs


def measure(report: dict) -> dict:
    """The quantities the model takes from a run."""
    epochs = steady_epochs(report)
    if not epochs:
        raise ProjectionError(f"run {report['run_id']} has no finished epoch to project from")
    scaling = report["data"].get("scaling") or {}
    if scaling.get("simulated"):
        raise ProjectionError(f"run {report['run_id']} simulated {scaling['world_size']} ranks on "
                              f"{scaling['processes']} process(es): its time per step is not one rank's; project "
                              "from a run of real ranks")
    compute, comm, epoch_s, data_s, steps, spreads, waits = [], [], [], [], [], [], []
    for e in epochs:
        shares = [r["cpu_wait_share"] for r in e["ranks"] if r.get("cpu_wait_share") is not None]
        if shares:
            waits.append(max(shares))
        per_rank = []
        for r in e["ranks"]:
            n = max(1, r["steps"])
            step = (r["step_s"] - r.get("tracing_s", 0.0)) / n
            c = r.get("comm_s", 0.0) / n
            per_rank.append((step - c, c))
            spreads.append(r.get("step_spread", 0.0))
        compute.append(max(p[0] for p in per_rank))
        comm.append(statistics.fmean(p[1] for p in per_rank))
        epoch_s.append(e["training_s"])
        data_s.append(max(r["data_s"] for r in e["ranks"]))
        steps.append(max(r["steps"] for r in e["ranks"]))
    w = report["world"]
    probe = (report.get("breakdown") or {}).get("probe") or {}
    methods = {r.get("comm_method") for e in epochs for r in e["ranks"]}
    m = {
        "run": report["run_id"], "ranks": w["size"],
        "ranks_per_node": max(len(v) for v in w["hosts"].values()),
        "hosts": len(w["hosts"]),
        "threads": report["environment"].get("intra_op_threads"),
        "batch": report["data"]["batch_size_per_rank"], "train_size": report["data"]["train_size"],
        "steps_cap": (report.get("config") or {}).get("train", {}).get("steps_per_epoch"),
        "steps": statistics.median(steps),
        "compute_step_s": statistics.median(compute), "comm_step_s": statistics.median(comm),
        "comm_method": "/".join(sorted(x for x in methods if x)) or "none",
        "epoch_s": statistics.median(epoch_s), "data_s": statistics.median(data_s),
        "noise": statistics.median(spreads) / 2 if spreads else 0.0,
        "cpu_wait_share": statistics.median(waits) if waits else None,
        "gradient_bytes": probe.get("gradient_bytes"), "fit": probe.get("fit"),
        "probe_ranks": probe.get("ranks"), "epochs_used": [e["epoch"] for e in epochs],
    }
    m["rest_s"] = max(0.0, m["epoch_s"] - m["steps"] * (m["compute_step_s"] + m["comm_step_s"]) - m["data_s"])
    m["images_per_s"] = m["ranks"] * m["batch"] * m["steps"] / m["epoch_s"] if m["epoch_s"] > 0 else 0.0
    return m


def hops(p: int, model: str) -> float:
    if p <= 1:
        return 0.0
    return 2.0 * math.ceil(math.log2(p)) if model == "tree" else 2.0 * (p - 1)


def comm_model(source: dict | None, latency_s: float | None = None, bandwidth_Bps: float | None = None,
               latency_model: str = "ring") -> dict:
    """Per-hop latency, link bandwidth and calibration k, from a multi-rank run and/or given numbers."""
    if source is not None and source["ranks"] > 1 and source.get("fit") and source.get("gradient_bytes"):
        p0, fit, n = source["ranks"], source["fit"], source["gradient_bytes"]
        hop = fit["latency_s"] / hops(p0, latency_model)
        link = fit["bandwidth_Bps"] * 2 * (p0 - 1) / p0   # per-link bandwidth from the measured 1/bandwidth
        predicted = hops(p0, latency_model) * hop + 2 * (p0 - 1) / p0 * n / link
        k = source["comm_step_s"] / predicted if predicted > 0 and source["comm_step_s"] > 0 else 1.0
        out = {"latency_hop_s": hop, "link_Bps": link, "k": k, "p0": p0, "source": source["run"],
               "source_method": source["comm_method"], "measured_step_s": source["comm_step_s"],
               "gradient_bytes": n, "same_host": source["hosts"] == 1}
    elif latency_s is None or bandwidth_Bps is None:
        raise ProjectionError("no allreduce cost to project with: the run has 1 rank (no allreduce is "
                              "measured); give a multi-rank run of the same config, or --latency-us and "
                              "--bandwidth-gbs for your network")
    else:
        out = {"latency_hop_s": None, "link_Bps": None, "k": 1.0, "p0": None, "source": None,
               "source_method": None, "measured_step_s": None, "gradient_bytes": None, "same_host": False}
    if latency_s is not None:
        out["latency_hop_s"] = latency_s
    if bandwidth_Bps is not None:
        out["link_Bps"] = bandwidth_Bps
    out["given"] = latency_s is not None or bandwidth_Bps is not None
    out["latency_model"] = latency_model
    return out


def comm_step(cm: dict, p: int, gradient_bytes: int) -> float:
    if p <= 1:
        return 0.0
    return cm["k"] * (hops(p, cm["latency_model"]) * cm["latency_hop_s"]
                      + 2 * (p - 1) / p * gradient_bytes / cm["link_Bps"])


def steps_for(base: dict, p: int) -> int:
    full = base["train_size"] // (p * base["batch"])
    return min(full, base["steps_cap"]) if base["steps_cap"] else full


def predict(base: dict, cm: dict, p: int, steps: int | None = None) -> dict:
    steps = steps_for(base, p) if steps is None else steps
    n = base["gradient_bytes"] or cm.get("gradient_bytes") or 0
    comm = comm_step(cm, p, n) if p > 1 else 0.0
    step = base["compute_step_s"] + comm
    data = base["data_s"] * steps / base["steps"] if base["steps"] else base["data_s"]
    epoch = steps * step + data + base["rest_s"]
    return {"ranks": p, "steps": steps, "compute_step_s": base["compute_step_s"], "comm_step_s": comm,
            "step_s": step, "epoch_s": epoch,
            "images_per_s": p * base["batch"] * steps / epoch if epoch > 0 and steps > 0 else 0.0}


def stated_error(base: dict) -> float:
    return ERROR_FLOOR + base["noise"]


def project(base_report: dict, comm_report: dict | None = None, nodes=NODES, ranks_per_node: int | None = None,
            latency_s: float | None = None, bandwidth_Bps: float | None = None,
            latency_model: str = "ring", accuracy: dict | None = None) -> dict:
    """Projection table for `nodes` nodes of `ranks_per_node` ranks each (default: as in the base run).
    With `accuracy` ({"points": a recipe's points of the accuracy basis, "recipe", "target"}), each
    row also gets the accuracy expected at its global batch and the time to the target."""
    base = measure(base_report)
    source = measure(comm_report) if comm_report is not None else (base if base["ranks"] > 1 else None)
    cm = comm_model(source, latency_s, bandwidth_Bps, latency_model)
    if not base["gradient_bytes"]:
        base["gradient_bytes"] = cm.get("gradient_bytes")
    if not base["gradient_bytes"]:
        raise ProjectionError(f"run {base['run']} records no gradient size (written before the allreduce probe existed)")
    rpn = ranks_per_node or base["ranks_per_node"]
    here = predict(base, cm, base["ranks"], steps=int(base["steps"]))
    ref_ips = here["images_per_s"]
    rows = []
    for n in nodes:
        p = n * rpn
        row = predict(base, cm, p)
        row["nodes"] = n
        if row["steps"] < 1:
            row.update(epoch_s=None, images_per_s=None, speedup=None, efficiency=None,
                       note=f"fewer than one step per epoch at {p} ranks x {base['batch']} images")
        else:
            row["speedup"] = row["images_per_s"] / ref_ips if ref_ips > 0 else None
            row["efficiency"] = row["speedup"] / (p / base["ranks"]) if row["speedup"] is not None else None
        rows.append(row)
    proj = {"recipe": None, "base": base, "comm": cm, "ranks_per_node": rpn, "rows": rows,
            "stated_error": stated_error(base), "assumptions": assumptions(base, cm, rpn)}
    if accuracy is not None:
        add_time_to_accuracy(proj, accuracy)
    return proj


def optimizers(points: list[dict]) -> str:
    """Which optimizer and warm-up the job used at which global batches of the basis."""
    runs: list[list] = []
    for p in points:
        setting = f"{p.get('optimizer')} with a {p.get('warmup_epochs'):g}-epoch warm-up"
        if runs and runs[-1][0] == setting:
            runs[-1][2] = p["global_batch"]
        else:
            runs.append([setting, p["global_batch"], p["global_batch"]])
    return ", ".join(f"{s} at {lo}" + (f"–{hi}" if hi != lo else "") for s, lo, hi in runs)


def add_time_to_accuracy(proj: dict, accuracy: dict) -> None:
    """Per row: the global batch (weak scaling), the accuracy the basis expects there, the epochs to
    the target (the slowest seed) and so the time; and the node count after which more nodes no
    longer shorten that time."""
    from . import basis

    points, target, batch = accuracy["points"], accuracy["target"], proj["base"]["batch"]
    for row in proj["rows"]:
        g = row["ranks"] * batch
        e = basis.expect(points, g, target)
        row.update(global_batch=g, expected_accuracy=e["accuracy_mean"], expected_accuracy_sd=e["accuracy_sd"],
                   epochs_to_target=e["epochs_to_target"], within_basis=e["within"],
                   time_to_target_s=(e["epochs_to_target"] * row["epoch_s"]
                                     if e["epochs_to_target"] is not None and row.get("epoch_s") else None))
    timed = [r for r in proj["rows"] if r["time_to_target_s"] is not None]
    best = min(timed, key=lambda r: r["time_to_target_s"]) if timed else None
    lo, hi = basis.measured_range(points)
    proj["accuracy"] = {
        "recipe": accuracy["recipe"], "target": target, "measured": [lo, hi],
        "fastest_nodes": best["nodes"] if best else None,
        "fastest_time_s": best["time_to_target_s"] if best else None,
        "lines": [
            f"accuracy basis: the {accuracy['recipe']} recipe's scan ({len(points)} global batches, {lo}–{hi}, "
            f"{'/'.join(str(len(p['seeds'])) for p in points)} seeds, {points[0]['epochs']} epochs, "
            f"lr_scaling {points[0]['lr_scaling']}, {optimizers(points)}; reporting/accuracy_basis.json); "
            "interpolated in log2(global "
            "batch) between measured points, nothing claimed outside them",
            f"epochs to {target:.0%}: the first epoch at which every seed's validation accuracy reached it, in the "
            f"scan's {points[0]['epochs']}-epoch schedule (a shorter schedule decays sooner, so this is an upper "
            "bound for it); time to target = those epochs x the projected s/epoch (start-up and evaluation excluded)",
            (f"more nodes stop shortening the time to {target:.0%} after {best['nodes']} node{'s' if best['nodes'] != 1 else ''} "
             f"({best['time_to_target_s']:.0f} s): beyond, the global batch needs more epochs than the nodes save, "
             f"or the basis does not reach {target:.0%} there" if best else
             f"no node count reaches {target:.0%} within the basis"),
        ],
    }


def validate(base_report: dict, target_report: dict, latency_model: str = "ring") -> dict:
    """Project the target run's world size from the base run; compare with the measured time."""
    base, target = measure(base_report), measure(target_report)
    cm = comm_model(target if target["ranks"] > 1 else None, latency_model=latency_model) \
        if target["ranks"] > 1 else {"k": 1.0, "latency_hop_s": 0.0, "link_Bps": 1.0, "latency_model": latency_model}
    if not base["gradient_bytes"]:
        base["gradient_bytes"] = target["gradient_bytes"]
    pred = predict(base, cm, target["ranks"], steps=int(target["steps"]))
    error = (pred["epoch_s"] - target["epoch_s"]) / target["epoch_s"]
    stated = stated_error(base)
    notes = []
    wb, wt = base["cpu_wait_share"], target["cpu_wait_share"]
    comparable = wb is None or wt is None or wt - wb <= MAX_EXTRA_CPU_WAIT
    adjusted = None
    if wb is not None and wt is not None and wt < 1 and base["compute_step_s"] > 0:
        # diagnostic: the same projection with the compute slowed by the CPU availability measured in
        # the target ((1 - its wait share) vs the base's): how much of the error contention explains
        slowed = dict(base, compute_step_s=base["compute_step_s"] * (1 - wb) / (1 - wt))
        adj = predict(slowed, cm, target["ranks"], steps=int(target["steps"]))
        adjusted = {"projected_epoch_s": adj["epoch_s"],
                    "error": (adj["epoch_s"] - target["epoch_s"]) / target["epoch_s"],
                    "compute_factor": (1 - wb) / (1 - wt)}
    if not comparable:
        notes.append(f"not comparable: in {target['run']} the ranks' threads waited {wt:.0%} of their runnable "
                     f"time for a core, in {base['run']} {wb:.0%}: the node was oversubscribed (by other jobs, "
                     f"or by the ranks' own Horovod/MPI threads next to their compute threads), which the model "
                     f"assumes away (each rank's threads have cores to themselves)")
    if base["threads"] != target["threads"]:
        notes.append(f"threads per rank differ ({base['threads']} in {base['run']}, {target['threads']} in "
                     f"{target['run']}): the compute per step is not comparable, expect a large error")
    return {"base": base["run"], "target": target["run"], "base_ranks": base["ranks"], "target_ranks": target["ranks"],
            "steps": int(target["steps"]), "epochs_used": target["epochs_used"],
            "projected_epoch_s": pred["epoch_s"], "measured_epoch_s": target["epoch_s"],
            "projected_step_s": pred["step_s"],
            "measured_step_s": target["compute_step_s"] + target["comm_step_s"],
            "projected_images_per_s": pred["images_per_s"], "measured_images_per_s": target["images_per_s"],
            "error": error, "stated_error": stated, "within": abs(error) <= stated, "comparable": comparable,
            "cpu_wait_share": {"base": wb, "target": wt}, "with_measured_contention": adjusted,
            "notes": notes}


def assumptions(base: dict, cm: dict, rpn: int) -> list[str]:
    lines = [
        f"weak scaling: {base['batch']} images per rank per step at every size; {rpn} rank(s) per node "
        f"with {base['threads']} thread(s) each, as in run {base['run']}",
        "each rank's threads (compute, and Horovod's background thread) have cores to themselves"
        + (f" (in run {base['run']} they waited {base['cpu_wait_share']:.0%} of their runnable time for a core)"
           if base.get("cpu_wait_share") is not None else ""),
        f"compute per step {1e3 * base['compute_step_s']:.1f} ms (slowest rank, steady epochs "
        f"{base['epochs_used']} of {base['run']}), unchanged with the number of ranks",
        f"allreduce of {base['gradient_bytes'] / 1e6:.2f} MB of gradients per step, modelled as a "
        f"{cm['latency_model']} allreduce: {'2(p-1)' if cm['latency_model'] == 'ring' else '2 ceil(log2 p)'} "
        f"latency hops + 2(p-1)/p x bytes / link bandwidth",
    ]
    if cm.get("latency_hop_s") is not None:
        lines.append(f"latency per hop {1e6 * cm['latency_hop_s']:.0f} µs, link bandwidth {cm['link_Bps'] / 1e9:.2f} GB/s"
                     + (" (given on the command line)" if cm.get("given") else
                        f" (from the allreduce probe's fit on {cm['p0']} ranks of run {cm['source']})"))
    if cm.get("source"):
        lines.append(f"calibration k = {cm['k']:.2f}: run {cm['source']} recorded {1e3 * cm['measured_step_s']:.1f} ms "
                     f"of communication per step ({cm['source_method']}), k times the fit's prediction "
                     f"(training reduces the gradients in several rounds while compute competes for the cores)")
        if cm["source_method"] == "probe":
            lines.append("the communication recorded was estimated by the probe, not measured: projected "
                         "times are likely optimistic; run with report.timeline: true for a measured value")
    if cm.get("same_host") and not cm.get("given"):
        lines.append("the probe ran within one host (shared memory); between nodes latency is higher and "
                     "bandwidth lower: pass --latency-us/--bandwidth-gbs for your interconnect")
    lines += [
        f"steps per epoch: {base['train_size']} training images / (ranks x {base['batch']})"
        + (f", at most {base['steps_cap']} (train.steps_per_epoch)" if base["steps_cap"] else ""),
        f"per epoch also: data input {base['data_s']:.2f} s at {int(base['steps'])} steps (scaled with steps) "
        f"and a fixed {base['rest_s']:.2f} s (fit overhead, waiting)",
        "not modelled: overlap of allreduce with back-propagation, Horovod tensor fusion and cycle "
        "time changes, network contention, stragglers, start-up and evaluation time",
        f"stated error ±{100 * stated_error(base):.0f}% = {100 * ERROR_FLOOR:.0f}% for what is not modelled + "
        f"{100 * base['noise']:.0f}% measurement noise (half the interquartile spread of step times); "
        "it covers sizes up to the largest measured one, beyond that the assumptions dominate",
    ]
    return lines


def render(proj: dict, fmt: str = "text") -> list[str]:
    b = proj["base"]
    title = (f"Projected scaling of {proj.get('recipe') or b['run']} from run {b['run']} "
             f"({b['ranks']} rank{'s' if b['ranks'] != 1 else ''}, measured {b['epoch_s']:.2f} s/epoch "
             f"at {int(b['steps'])} steps, {b['images_per_s']:.0f} images/s)")
    head = ["nodes", "ranks", "steps/epoch", "compute ms/step", "comm ms/step", "s/epoch", "images/s",
            "speedup", "efficiency"]
    rows = [[str(r["nodes"]), str(r["ranks"]), str(r["steps"]), f"{1e3 * r['compute_step_s']:.1f}",
             f"{1e3 * r['comm_step_s']:.1f}", _f(r["epoch_s"], "{:.2f}"), _f(r["images_per_s"], "{:.0f}"),
             _f(r["speedup"], "{:.2f}x"), _f(r["efficiency"], "{:.0%}")] for r in proj["rows"]]
    acc = proj.get("accuracy")
    if acc:
        head += ["global batch", "acc expected", f"epochs to {acc['target']:.0%}", f"s to {acc['target']:.0%}"]
        for row, r in zip(rows, proj["rows"]):
            expected = (f"{r['expected_accuracy']:.2%} ±{r['expected_accuracy_sd']:.2%}"
                        if r["expected_accuracy"] is not None else "unmeasured")
            row += [str(r["global_batch"]), expected,
                    _f(r["epochs_to_target"], "{}") if r["within_basis"] else "unmeasured",
                    _f(r["time_to_target_s"], "{:.0f}")]
    lines = [title if fmt != "md" else f"### {title}", ""]
    lines += _table(head, rows, fmt)
    if acc:
        lines += ["", "Time to accuracy:"] + [("- " if fmt == "md" else "  - ") + a for a in acc["lines"]]
    lines += ["", "Assumptions:", ""] if fmt == "md" else ["", "Assumptions:"]
    lines += [("- " if fmt == "md" else "  - ") + a for a in proj["assumptions"]]
    return lines


def render_validation(v: dict, fmt: str = "text") -> list[str]:
    verdict = "within" if v["within"] else "OUTSIDE"
    if not v.get("comparable", True):
        verdict = "not comparable (see below), " + verdict
    text = (f"Validation: projected {v['target_ranks']} ranks from run {v['base']} ({v['base_ranks']} rank"
            f"{'s' if v['base_ranks'] != 1 else ''}): {v['projected_epoch_s']:.2f} s/epoch at {v['steps']} steps; "
            f"measured in run {v['target']}: {v['measured_epoch_s']:.2f} s/epoch (epochs {v['epochs_used']}); "
            f"error {100 * v['error']:+.1f}%, {verdict} the stated ±{100 * v['stated_error']:.0f}%")
    notes = list(v["notes"])
    adj = v.get("with_measured_contention")
    if adj and not v.get("comparable", True):
        notes.append(f"with the compute slowed by the target's measured CPU availability (x{adj['compute_factor']:.2f}): "
                     f"{adj['projected_epoch_s']:.2f} s/epoch, error {100 * adj['error']:+.1f}%")
    return [("- " if fmt == "md" else "") + text] + [("  - " if fmt == "md" else "  ") + n for n in notes]


def _f(x, spec: str) -> str:
    return "—" if x is None else spec.format(x)


def _table(head: list[str], rows: list[list[str]], fmt: str) -> list[str]:
    if fmt == "md":
        return ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return out
