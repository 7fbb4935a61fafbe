"""Projected scaling: what more nodes would buy, from a run's compute time per step and a measured
allreduce cost. A model, not a measurement; every assumption is printed with its numbers.

The model (weak scaling: every rank keeps its batch size, so the global batch grows with ranks):

  time per step(p)  = compute per step + communication per step(p)
  compute per step  = the slowest rank's (step time - communication) per step in the base run's
                      steady epochs (epoch 1 is left out when there are more: it holds tracing),
                      unchanged with p at the same per-rank batch b0; at another per-rank batch b,
                      x (b / b0) x speed(b0) / speed(b), speed being one rank's measured images/s
                      against its batch (the recipe's accuracy basis, fmnist_dist/bases)
  communication(p)  = k * [ h(p) * latency_hop + 2(p-1)/p * gradient_bytes / link_bandwidth ]
                      ring allreduce: h(p) = 2(p-1) latency hops (`tree`: 2 ceil(log2 p)), and
                      each rank sends and receives 2(p-1)/p of the gradients
  latency_hop, link_bandwidth: within one node, from the allreduce probe's fit seconds = latency +
                      bytes/bandwidth measured on p0 ranks (latency = h(p0) latency_hop, 1/bandwidth
                      = 2(p0-1)/p0 / link_bandwidth); across nodes, the --network preset's nominal
                      figures (scaling.NETWORKS) or given ones (--latency-us, --bandwidth-gbs)
  k                 = calibration (within one node): the communication per step recorded in the
                      comm-source run (Horovod timeline, or the probe's grouped allreduce) / the
                      fit's prediction for p0 ranks: how much worse training's allreduce is than
                      the isolated one
  steps per epoch(p)= floor(training images / (p * batch per rank)), capped by train.steps_per_epoch
  time per epoch(p) = steps(p) * time per step(p) + data input (scaled with steps) + a fixed
                      per-epoch rest (fit overhead, wait), both from the base run
  speedup(p) = images/s(p) / images/s(base); efficiency = speedup / (p / base ranks)

With the run's recipe's accuracy basis, each node count also gets the time to the target under
three uses of its ranks: weak scaling (the base run's batch per rank), strong scaling (the base run's
global batch split thinner) and the job's own choice (train.global_batch_size=auto, scaling.choose):
the epochs the job trains at that global batch (the recipe's, or with train.target_accuracy the
epochs to the target the basis measured) x the projected s/epoch, where the basis reached the target.

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

from .. import basis as basis_mod
from .. import config as config_mod
from .. import scaling
from ..errors import ProjectionError
from ..tables import table

NODES = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_NETWORK = "25gbe"
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
        "global_batch": report["data"].get("global_batch_size") or report["data"]["batch_size_per_rank"] * w["size"],
        "precision": "fp32" if (report.get("segments") or [{}])[0].get("precision", "fp32") == "fp32" else "bf16",
        "config": report.get("config") or {},
        "steps_cap": (report.get("config") or {}).get("train", {}).get("steps_per_epoch"),
        "steps": statistics.median(steps),
        "compute_step_s": statistics.median(compute), "comm_step_s": statistics.median(comm),
        "comm_method": "/".join(sorted(x for x in methods if x)) or "none",
        "epoch_s": statistics.median(epoch_s), "data_s": statistics.median(data_s),
        "noise": statistics.median(spreads) / 2 if spreads else 0.0,
        "cpu_wait_share": statistics.median(waits) if waits else None,
        "gradient_bytes": probe.get("gradient_bytes") or _gradient_bytes(report), "fit": probe.get("fit"),
        "probe_ranks": probe.get("ranks"), "epochs_used": [e["epoch"] for e in epochs],
    }
    m["rest_s"] = max(0.0, m["epoch_s"] - m["steps"] * (m["compute_step_s"] + m["comm_step_s"]) - m["data_s"])
    m["images_per_s"] = m["ranks"] * m["batch"] * m["steps"] / m["epoch_s"] if m["epoch_s"] > 0 else 0.0
    return m


def hops(p: int, model: str) -> float:
    if p <= 1:
        return 0.0
    return 2.0 * math.ceil(math.log2(p)) if model == "tree" else 2.0 * (p - 1)


def _gradient_bytes(report: dict) -> int | None:
    model = (report.get("config") or {}).get("model") or {}
    layers = model.get("layers")
    try:
        return config_mod.trainable_parameters(layers, bool(model.get("first_conv_frozen"))) \
            * scaling.GRADIENT_BYTES_PER_WEIGHT if layers else None
    except (KeyError, TypeError, IndexError):
        return None


def comm_model(source: dict | None, latency_s: float | None = None, bandwidth_Bps: float | None = None,
               latency_model: str = "ring", network: str = DEFAULT_NETWORK) -> dict:
    """Per-hop latency, link bandwidth and calibration k within one node (from a multi-rank run's
    probe, else the nominal shared-memory figures) and across nodes (given, else the network preset)."""
    if source is not None and source["ranks"] > 1 and source.get("fit") and source.get("gradient_bytes"):
        p0, fit, n = source["ranks"], source["fit"], source["gradient_bytes"]
        hop = fit["latency_s"] / hops(p0, latency_model)
        link = fit["bandwidth_Bps"] * 2 * (p0 - 1) / p0   # per-link bandwidth from the measured 1/bandwidth
        predicted = hops(p0, latency_model) * hop + 2 * (p0 - 1) / p0 * n / link
        k = source["comm_step_s"] / predicted if predicted > 0 and source["comm_step_s"] > 0 else 1.0
        out = {"latency_hop_s": hop, "link_Bps": link, "k": k, "p0": p0, "source": source["run"],
               "source_method": source["comm_method"], "measured_step_s": source["comm_step_s"],
               "gradient_bytes": n, "same_host": source["hosts"] == 1}
    else:
        hop, link = scaling.NETWORKS["shm"]
        out = {"latency_hop_s": hop, "link_Bps": link, "k": 1.0, "p0": None, "source": None,
               "source_method": None, "measured_step_s": None, "gradient_bytes": None, "same_host": True}
    if latency_s is not None and bandwidth_Bps is not None:
        out["network"] = {"name": "given", "latency_hop_s": latency_s, "link_Bps": bandwidth_Bps}
    elif latency_s is not None or bandwidth_Bps is not None:
        raise ProjectionError("give both --latency-us and --bandwidth-gbs, or a --network preset")
    else:
        hop, link = scaling.NETWORKS[network]
        out["network"] = {"name": network, "latency_hop_s": hop, "link_Bps": link}
    out["latency_model"] = latency_model
    return out


def comm_step(cm: dict, p: int, gradient_bytes: int, nodes: int = 1) -> float:
    """One step's allreduce on p ranks: within one node with the probe's figures (x k), across nodes
    with the network's."""
    if p <= 1:
        return 0.0
    k, hop, link = (cm["k"], cm["latency_hop_s"], cm["link_Bps"]) if nodes <= 1 else \
        (1.0, cm["network"]["latency_hop_s"], cm["network"]["link_Bps"])
    return k * (hops(p, cm["latency_model"]) * hop + 2 * (p - 1) / p * gradient_bytes / link)


def steps_for(base: dict, p: int, per_rank: int | None = None) -> int:
    full = base["train_size"] // (p * (per_rank or base["batch"]))
    return min(full, base["steps_cap"]) if base["steps_cap"] else full


def compute_at(base: dict, per_rank: int, throughput: dict | None) -> float:
    """The base run's compute per step carried to another per-rank batch along the measured curve
    (proportionally to the images where there is no curve or it does not reach that batch)."""
    b0, step = base["batch"], base["compute_step_s"]
    if per_rank == b0:
        return step
    s0 = scaling.rank_images_per_s(throughput, b0) if throughput else None
    s1 = scaling.rank_images_per_s(throughput, per_rank) if throughput else None
    return step * per_rank / b0 * (s0 / s1 if s0 and s1 else 1.0)


def predict(base: dict, cm: dict, p: int, steps: int | None = None, nodes: int = 1, per_rank: int | None = None,
            throughput: dict | None = None) -> dict:
    b = per_rank or base["batch"]
    steps = steps_for(base, p, b) if steps is None else steps
    n = base["gradient_bytes"] or cm.get("gradient_bytes") or 0
    comm = comm_step(cm, p, n, nodes) if p > 1 else 0.0
    compute = compute_at(base, b, throughput)
    step = compute + comm
    data = base["data_s"] * steps * b / (base["steps"] * base["batch"]) if base["steps"] else base["data_s"]
    epoch = steps * step + data + base["rest_s"]
    return {"ranks": p, "per_rank": b, "steps": steps, "compute_step_s": compute, "comm_step_s": comm,
            "step_s": step, "epoch_s": epoch,
            "images_per_s": p * b * steps / epoch if epoch > 0 and steps > 0 else 0.0}


def stated_error(base: dict) -> float:
    return ERROR_FLOOR + base["noise"]


def project(base_report: dict, comm_report: dict | None = None, nodes=NODES, ranks_per_node: int | None = None,
            latency_s: float | None = None, bandwidth_Bps: float | None = None,
            latency_model: str = "ring", accuracy: dict | None = None, network: str = DEFAULT_NETWORK) -> dict:
    """Projection table for `nodes` nodes of `ranks_per_node` ranks each (default: as in the base run),
    weak scaling. With `accuracy` ({"basis": the run's recipe's accuracy basis, "target"}), each row
    also gets the time to the target under weak and strong scaling and the job's own choice."""
    base = measure(base_report)
    source = measure(comm_report) if comm_report is not None else (base if base["ranks"] > 1 else None)
    cm = comm_model(source, latency_s, bandwidth_Bps, latency_model, network)
    if not base["gradient_bytes"]:
        base["gradient_bytes"] = cm.get("gradient_bytes")
    if not base["gradient_bytes"]:
        raise ProjectionError(f"run {base['run']} records no gradient size (written before the allreduce probe existed)")
    rpn = ranks_per_node or base["ranks_per_node"]
    here = predict(base, cm, base["ranks"], steps=int(base["steps"]), nodes=base["hosts"])
    ref_ips = here["images_per_s"]
    rows = []
    for n in nodes:
        p = n * rpn
        row = predict(base, cm, p, nodes=n)
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


SCENARIOS = ("weak", "strong", "auto")


def scenario(proj: dict, nodes: int, ranks: int, global_batch: int | None, points: list[dict], target: float,
             throughput: dict | None, early_stop: bool = False) -> dict | None:
    """One use of `ranks`: its global batch, the accuracy the basis expects, s/epoch and time to target
    (the epochs the job trains there, as scaling.choose counts them)."""
    if not global_batch or global_batch < ranks:
        return None
    base, per_rank = proj["base"], global_batch // ranks
    pred = predict(base, proj["comm"], ranks, nodes=nodes, per_rank=per_rank, throughput=throughput)
    e = basis_mod.expect(points, global_batch, target)
    reached = e["epochs_to_target"] is not None and e["accuracy_mean"] is not None and e["accuracy_mean"] >= target
    return {"global_batch": global_batch, "per_rank": per_rank, "epoch_s": pred["epoch_s"], "steps": pred["steps"],
            "expected_accuracy": e["accuracy_mean"], "expected_accuracy_sd": e["accuracy_sd"], "within_basis": e["within"],
            "epochs_to_target": e["epochs_to_target"] if reached else None,
            "epochs_trained": basis_mod.epochs_trained(e, early_stop) if reached else None,
            "time_to_target_s": basis_mod.epochs_trained(e, early_stop) * pred["epoch_s"]
            if reached and pred["steps"] else None}


def add_time_to_accuracy(proj: dict, accuracy: dict) -> None:
    """Per row: weak, strong and the job's choice, each with its global batch, expected accuracy and
    time to the target; and per use, the node count after which more nodes stop shortening it."""
    b, target, base = accuracy["basis"], accuracy["target"], proj["base"]
    points = basis_mod.recipe_points(b)
    curves = (b.get("throughput") or {}).get("precisions") or {}
    throughput = curves.get(base["precision"]) or next(iter(curves.values()), None)
    given = base["config"].get("train") or {}
    train = {**given, "batch_size": given.get("batch_size", base["batch"]), "interconnect": proj["comm"]["network"]["name"]}
    network = proj["comm"]["network"]
    for row in proj["rows"]:
        n, p = row["nodes"], row["ranks"]
        choice = scaling.choose(p, n, train, b, base["precision"], base["gradient_bytes"], base["train_size"], target,
                                network=(network["latency_hop_s"], network["link_Bps"]))
        batches = {"weak": p * base["batch"], "strong": base["global_batch"] // p * p,
                   "auto": choice["global_batch"] or p * base["batch"]}
        early_stop = given.get("target_accuracy") is not None
        row["time_to_target"] = {k: scenario(proj, n, p, g, points, target, throughput, early_stop)
                                 for k, g in batches.items()}
        row["choice"] = choice["reason"]
    lo, hi = basis_mod.measured_range(points)
    fastest = {}
    for k in SCENARIOS:
        timed = [(r["nodes"], r["time_to_target"][k]["time_to_target_s"]) for r in proj["rows"]
                 if r["time_to_target"][k] and r["time_to_target"][k]["time_to_target_s"] is not None]
        fastest[k] = min(timed, key=lambda x: x[1]) if timed else None
    proj["accuracy"] = {
        "recipe": b["recipe"], "target": target, "measured": [lo, hi], "fastest": fastest,
        "throughput": throughput is not None,
        "lines": [
            f"accuracy basis: the {b['recipe']} recipe's scan ({len(points)} global batches, {lo}–{hi}, "
            f"{'/'.join(str(len(p['seeds'])) for p in points)} seeds, {points[0]['epochs']} epochs, "
            f"lr_scaling {points[0]['lr_scaling']}, {optimizers(points)}; {basis_mod.shown_path(b)}); interpolated "
            "in log2(global batch) between measured points, nothing claimed outside them",
            f"a global batch reaches {target:.1%} where every seed's validation accuracy reached it in the scan's "
            f"{points[0]['epochs']}-epoch schedule and the mean test accuracy reached it too; time to target = the "
            "epochs the job trains there x the projected s/epoch (start-up and evaluation excluded): all of them, "
            "or with train.target_accuracy the first at which every seed had reached it, as the job weighs them",
            f"weak: {base['batch']} per rank; strong: the base run's global batch {base['global_batch']}; auto: "
            "what train.global_batch_size=auto would choose on that many ranks (scaling.choose)",
            "compute at other per-rank batches: " + ("along the recipe's measured throughput curve "
                                                     f"({base['precision']})" if throughput else
                                                     "proportional to the images (no throughput curve in the basis)"),
        ] + [f"{k}: " + (f"fastest to {target:.1%} at {f[0]} node{'s' if f[0] != 1 else ''} ({f[1]:.0f} s)" if f
                         else f"reaches {target:.1%} at no node count within the basis")
             for k, f in fastest.items()],
    }


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


def validate(base_report: dict, target_report: dict, latency_model: str = "ring",
             throughput: dict | None = None) -> dict:
    """Project the target run's world size (and per-rank batch: strong scaling moves the compute
    along `throughput`, one rank's images/s against its batch) from the base run; compare with the
    measured time."""
    base, target = measure(base_report), measure(target_report)
    cm = comm_model(target if target["ranks"] > 1 else None, latency_model=latency_model) \
        if target["ranks"] > 1 else {"k": 1.0, "latency_hop_s": 0.0, "link_Bps": 1.0, "latency_model": latency_model}
    if not base["gradient_bytes"]:
        base["gradient_bytes"] = target["gradient_bytes"]
    pred = predict(base, cm, target["ranks"], steps=int(target["steps"]), per_rank=target["batch"],
                   throughput=throughput)
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
        adj = predict(slowed, cm, target["ranks"], steps=int(target["steps"]), per_rank=target["batch"],
                      throughput=throughput)
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
            "base_batch": base["batch"], "target_batch": target["batch"], "target_hosts": target["hosts"],
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
    net = cm["network"]
    lines.append(f"within one node: latency per hop {1e6 * cm['latency_hop_s']:.0f} µs, link bandwidth "
                 f"{cm['link_Bps'] / 1e9:.2f} GB/s" + (f" (from the allreduce probe's fit on {cm['p0']} ranks of run "
                                                      f"{cm['source']})" if cm.get("source") else
                                                      " (nominal shared memory: the run has no multi-rank probe)"))
    lines.append(f"across nodes: latency per hop {1e6 * net['latency_hop_s']:.0f} µs, link bandwidth "
                 f"{net['link_Bps'] / 1e9:.2f} GB/s" + (" (given on the command line)" if net["name"] == "given" else
                                                       f" (--network {net['name']}, nominal: scaling.NETWORKS)"))
    if cm.get("source"):
        lines.append(f"calibration k = {cm['k']:.2f} within one node: run {cm['source']} recorded "
                     f"{1e3 * cm['measured_step_s']:.1f} ms of communication per step ({cm['source_method']}), k times "
                     "the fit's prediction (training reduces the gradients in several rounds while compute competes "
                     "for the cores)")
        if cm["source_method"] == "probe":
            lines.append("the communication recorded was estimated by the probe, not measured: projected "
                         "times are likely optimistic; run with report.timeline: true for a measured value")
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
    lines = [title if fmt != "md" else f"### {title}", ""]
    lines += table(head, rows, fmt, left=0)
    if acc:
        lines += ["", f"Time to {acc['target']:.1%} ({acc['recipe']} recipe): global batch, expected test accuracy, "
                      "seconds of training", ""]
        lines += table(*time_to_target_table(proj), fmt, left=0)
        lines += ["", "Time to accuracy:"] + [("- " if fmt == "md" else "  - ") + a for a in acc["lines"]]
    lines += ["", "Assumptions:", ""] if fmt == "md" else ["", "Assumptions:"]
    lines += [("- " if fmt == "md" else "  - ") + a for a in proj["assumptions"]]
    return lines


def time_to_target_table(proj: dict) -> tuple[list[str], list[list[str]]]:
    head = ["nodes", "ranks"] + [f"{k} {c}" for k in SCENARIOS for c in ("batch", "acc", "s")]
    rows = []
    for r in proj["rows"]:
        cells = [str(r["nodes"]), str(r["ranks"])]
        for k in SCENARIOS:
            sc = r["time_to_target"][k]
            if sc is None:
                cells += ["—", "—", "—"]
                continue
            cells += [str(sc["global_batch"]),
                      f"{sc['expected_accuracy']:.2%}" if sc["expected_accuracy"] is not None else "unmeasured",
                      _f(sc["time_to_target_s"], "{:.0f}")]
        rows.append(cells)
    return head, rows


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
