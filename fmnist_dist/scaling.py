"""How the global batch is split: weak or strong scaling, real or simulated ranks.

Synchronous data-parallel training at global batch B makes the same update on any number of ranks
but for batch norm, whose statistics each rank takes over its own batch (and the dropout masks
and flips drawn, which are noise). So W ranks are simulated faithfully on fewer processes: each
process takes W/processes ranks' batches in one batch and runs the forward pass once per rank's
share (training.model.SimulatedRanks). The learning-rate scaling, warm-up and schedule follow the
global batch, so they see W.

From train.large_batch_from on, the large-batch recipe takes over: Adam (or AdamW) becomes LAMB,
which bounds each layer's step by its own weight norm, and the warm-up lasts at least
LARGE_BATCH_WARMUP_EPOCHS. Measured (docs/scaling.md): at a global batch of 8,192 the one-epoch
warm-up is 6 steps, in which Adam's rate climbs 32-fold and the training loss blows up to 10.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .basis import epochs_trained, expect, recipe_points
from .errors import ConfigError

LARGE_BATCH_WARMUP_EPOCHS = 5.0     # 30 steps at 8,192: what the warm-up needs there (measured)


@dataclass(frozen=True)
class BatchPlan:
    processes: int          # real ranks
    world: int              # ranks trained as: train.simulate_world_size, else processes
    global_batch: int
    reference_batch: int    # train.batch_size: the batch train.lr is meant for
    mode: str               # "weak": train.batch_size per rank; "strong": train.global_batch_size fixed
    large_from: int | None = None   # train.large_batch_from

    @property
    def large(self) -> bool:
        """Whether the large-batch recipe applies (LAMB, a longer warm-up)."""
        return self.large_from is not None and self.global_batch >= self.large_from

    @property
    def per_rank(self) -> int:
        """The batch of one (real or simulated) rank: what its batch norm normalizes over."""
        return self.global_batch // self.world

    @property
    def per_process(self) -> int:
        return self.global_batch // self.processes

    @property
    def lr_factor(self) -> float:
        """How many reference batches one step takes: the world size under weak scaling."""
        return self.global_batch / self.reference_batch

    @property
    def ranks_per_process(self) -> int:
        return self.world // self.processes

    def describe(self) -> dict:
        """The report's record of the split."""
        return {"mode": self.mode, "processes": self.processes, "world_size": self.world,
                "simulated": self.world != self.processes, "global_batch_size": self.global_batch,
                "batch_size_per_rank": self.per_rank, "batch_size_per_process": self.per_process,
                "lr_factor": self.lr_factor}


def plan_batches(train: Any, processes: int, chosen: int | None = None, chosen_world: int | None = None) -> BatchPlan:
    """The split for `processes` real ranks from the train section (a namespace or a dict). Under
    train.global_batch_size=auto, `chosen` is the job's choice (choose()), None weak scaling, and
    `chosen_world` the ranks it simulates, if any."""
    get = train.get if isinstance(train, dict) else lambda key: getattr(train, key)
    simulate, global_batch, batch = get("simulate_world_size"), get("global_batch_size"), get("batch_size")
    if global_batch == "auto":          # the choice is weak scaling's batch, or another that stays fixed
        simulate = chosen_world or simulate     # chosen for `simulate` ranks when set, so never fewer
        global_batch = None if chosen == batch * (simulate or processes) else chosen
    large_from = get("large_batch_from")
    world = simulate or processes
    if world % processes:
        raise ConfigError(
            f"train.simulate_world_size={simulate} is not a multiple of the {processes} processes: each "
            f"process carries the same number of simulated ranks (use {_multiples(processes, world)})")
    if global_batch is None:
        return BatchPlan(processes, world, batch * world, batch, "weak", large_from)
    if global_batch % world:
        raise ConfigError(
            f"train.global_batch_size={global_batch} does not divide among {world} ranks "
            f"({global_batch}/{world} is not whole): use {_multiples(world, global_batch)}, or another rank count")
    mode = "weak" if global_batch == batch * world else "strong"   # the same split, whichever key named it
    return BatchPlan(processes, world, global_batch, batch, mode, large_from)


def _multiples(unit: int, near: int) -> str:
    below, above = near // unit * unit, (near // unit + 1) * unit
    return f"{below} or {above}" if below else str(above)


# ---------------------------------------------------------------------------------------------
# train.global_batch_size: auto. The job picks the global batch that reaches its recipe's target
# soonest on the ranks it was given: the recipe's accuracy basis says which global batches reach the
# target (and after how many epochs); the recipe's measured throughput against the per-rank batch
# and an allreduce model say how long each epoch of each would take. Weak scaling where the larger
# global batch keeps the accuracy, strong scaling (a fixed global batch split thinner) where it
# would not.

# Nominal allreduce figures: (latency per ring hop in s, link bandwidth in B/s): line rate at about
# 92% for TCP/RDMA payload, latencies typical of MPI point-to-point on each fabric. Within one node
# the ranks reduce through shared memory.
NETWORKS = {
    "shm": (2e-6, 10e9),
    "10gbe": (30e-6, 1.15e9),
    "25gbe": (20e-6, 2.9e9),
    "100gbe": (10e-6, 11.5e9),
    "hdr-ib": (2e-6, 23e9),
}
# Below this, a rank's batch norm statistics are too noisy for a basis measured at 256 per rank to
# speak for it, and a rank's step is mostly fixed costs. At 16 the default recipe's 512 split over 32
# ranks kept its accuracy (docs/scaling.md); nothing smaller was measured.
MIN_RANK_BATCH = 16
# Nor above the basis's own ranks (train.batch_size when it was scanned): real ranks of 512 ended
# 0.1-0.3 points below the basis's ranks of 256 at the same global batch, beyond the margin below,
# and one fp32 seed missed 92% (docs/results.md). A rank's batch norm is part of the recipe, so a
# process given more than one rank's share trains it as simulated ranks of the basis's size, as the
# basis itself was measured (SimulatedRanks).
GRADIENT_BYTES_PER_WEIGHT = 4     # gradients are reduced in fp32, bf16 runs included
# Projected times closer than this are a tie (the projection's own error is larger), settled by the
# higher expected accuracy: a larger global batch must buy real time for the accuracy it costs.
TIE = 0.05
# A candidate must be expected to clear the target by more than splitting its batch has been seen
# to move a mean. A basis point is a 3-seed mean with ranks of 256; the same global batch split over
# 4 to 32 ranks moved that mean by up to 0.18 points (docs/scaling.md): a choice that cleared its
# target by 0.09 missed it by 0.03 at 8 nodes, and one that cleared it by 0.17 kept it by only 0.02.
MARGIN = 0.0020


def allreduce_s(ranks: int, nodes: int, gradient_bytes: int, network: str | tuple[float, float]) -> float:
    """A ring allreduce of the gradients: 2(p-1) latency hops and 2(p-1)/p of the bytes over each link,
    at the interconnect's figures (a preset's name, or latency and bandwidth) once the ranks span nodes."""
    if ranks <= 1:
        return 0.0
    latency, bandwidth = NETWORKS["shm"] if nodes <= 1 else NETWORKS[network] if isinstance(network, str) else network
    return 2 * (ranks - 1) * latency + 2 * (ranks - 1) / ranks * gradient_bytes / bandwidth


def rank_images_per_s(throughput: dict, per_rank: int) -> float | None:
    """One rank's images/s at this batch, interpolated in log2(batch) between measured batches."""
    batches, speeds = throughput["batches"], throughput["images_per_s"]
    if not batches[0] <= per_rank <= batches[-1]:
        return None
    for (b0, s0), (b1, s1) in zip(zip(batches, speeds), zip(batches[1:], speeds[1:])):
        if b0 <= per_rank <= b1:
            f = 0.0 if b1 == b0 else math.log2(per_rank / b0) / math.log2(b1 / b0)
            return s0 + f * (s1 - s0)
    return speeds[-1]


def epoch_s(global_batch: int, ranks: int, nodes: int, train_size: int, throughput: dict,
            gradient_bytes: int, network: str | tuple[float, float], share: int | None = None) -> float | None:
    """Projected seconds of an epoch; a process simulating ranks computes each `share` at its speed."""
    per_rank = global_batch // ranks
    speed = rank_images_per_s(throughput, share or per_rank)
    if speed is None:
        return None
    steps = train_size // global_batch
    return steps * (per_rank / speed + allreduce_s(ranks, nodes, gradient_bytes, network))


def candidates(points: list[dict], ranks: int, weak: int) -> list[int]:
    """Global batches worth weighing: each measured one (rounded to a multiple of the ranks) and weak
    scaling's; no rank below MIN_RANK_BATCH."""
    rounded = {max(ranks, round(p["global_batch"] / ranks) * ranks) for p in points}
    return sorted(g for g in rounded | {weak} if g // ranks >= MIN_RANK_BATCH)


def split_words(per_rank: int, batch_size: int) -> str:
    """How the chosen split relates to train.batch_size: "strong scaling" only for a global batch
    split thinner than weak scaling would; a larger batch per rank is a different trade."""
    if per_rank == batch_size:
        return "weak scaling"
    if per_rank < batch_size:
        return "strong scaling"
    return f"larger than train.batch_size {batch_size}"


def rank_text(row: dict) -> str:
    """A candidate's split: its ranks' batch, or the simulated ranks each process carries."""
    if "simulated_world" in row:
        return f"{row['per_process']} per process as {row['simulated_world']} simulated ranks of {row['per_rank']}"
    return f"{row['per_rank']} per rank"


def split_text(row: dict, batch_size: int) -> str:
    return f"{rank_text(row)}, {split_words(row['per_rank'], batch_size)}"


def taken(row: dict, weak: int) -> dict:
    """The choice's split for the candidate taken: simulated ranks train as weak scaling does, at the
    basis's own rank batch."""
    simulated = "simulated_world" in row
    return {"mode": "weak" if row["global_batch"] == weak or simulated else "strong",
            **({"simulated_world": row["simulated_world"]} if simulated else {})}


def choose(ranks: int, nodes: int, train: dict, basis: dict | None, precision: str, gradient_bytes: int,
           train_size: int, target: float, network: str | tuple[float, float] | None = None) -> dict:
    """The global batch train.global_batch_size=auto trains with, and why: every candidate weighed
    with its expected accuracy, epochs and projected time (report: data.scaling.choice). The network
    between nodes is train.interconnect's unless given."""
    weak = train["batch_size"] * ranks
    if basis is None:
        return {"global_batch": None, "mode": "weak", "reason": "no accuracy basis for this recipe: weak scaling, "
                f"train.batch_size {train['batch_size']} per rank", "candidates": []}
    measured_rank = basis["config"]["train"]["batch_size"]
    if train["batch_size"] != measured_rank:       # a per-rank batch asked for: it wins, as global_batch_size does
        return {"global_batch": None, "mode": "weak", "candidates": [],
                "reason": f"train.batch_size {train['batch_size']} asked for (the {basis['recipe']} basis measured "
                          f"ranks of {measured_rank}): weak scaling"}
    points = recipe_points(basis)
    lo, hi = points[0]["global_batch"], points[-1]["global_batch"]
    curves = (basis.get("throughput") or {}).get("precisions") or {}
    throughput = curves.get(precision) or next(iter(curves.values()), None)
    if throughput is None:
        return {"global_batch": None, "mode": "weak", "candidates": [],
                "reason": f"the {basis['recipe']} basis has no throughput curve (bench --batch-curve): weak scaling, "
                          f"train.batch_size {train['batch_size']} per rank"}
    network = network or train.get("interconnect") or "25gbe"
    early_stop = train.get("target_accuracy") is not None
    weighed = []
    for g in candidates(points, ranks, weak):
        e = expect(points, min(max(g, lo), hi) if abs(g - min(max(g, lo), hi)) < ranks else g, target)
        share = g // ranks
        row = {"global_batch": g, "per_rank": share, "expected_accuracy": e["accuracy_mean"],
               "epochs_to_target": e["epochs_to_target"], "epochs": e.get("epochs")}
        if share > measured_rank and share % measured_rank == 0:     # the basis's ranks, simulated
            share = measured_rank
            row.update(per_rank=share, per_process=g // ranks, simulated_world=g // share)
        per_epoch = epoch_s(g, ranks, nodes, train_size, throughput, gradient_bytes, network, share)
        if not e["within"]:
            row["rejected"] = f"outside the basis ({lo}–{hi}): accuracy not measured"
        elif e["accuracy_mean"] < target + MARGIN:
            row["rejected"] = (f"expected {e['accuracy_mean']:.2%} < target {target:.1%}"
                               + (f" + {MARGIN * 100:.2f} points of margin" if e["accuracy_mean"] >= target else ""))
        elif share > measured_rank:
            row["rejected"] = f"ranks of {share}: the basis measured ranks of {measured_rank}"
        elif per_epoch is None:
            row["rejected"] = f"throughput not measured at {share} per rank"
        else:
            epochs = epochs_trained(e, early_stop)
            row.update(epoch_s=per_epoch, epochs_trained=epochs, projected_s=epochs * per_epoch)
        weighed.append(row)
    usable = [r for r in weighed if "projected_s" in r]
    if not usable:
        return closest(weighed, ranks, weak, measured_rank, basis["recipe"], target)
    fastest = min(r["projected_s"] for r in usable)
    best = max((r for r in usable if r["projected_s"] <= fastest * (1 + TIE)),
               key=lambda r: (r["expected_accuracy"], -r["global_batch"]))
    for r in usable:
        if r is not best:
            r["rejected"] = (f"projected {r['projected_s']:.0f} s against {best['projected_s']:.0f} s"
                             + (f", expected {r['expected_accuracy']:.2%}: within {TIE:.0%} of the time, less accurate"
                                if r["projected_s"] <= fastest * (1 + TIE) else ""))
    return {"global_batch": best["global_batch"], **taken(best, weak), "candidates": weighed,
            "network": network if isinstance(network, str) else list(network),
            "precision": precision if precision in curves else next(iter(curves), None),
            "reason": f"{best['global_batch']} ({split_text(best, train['batch_size'])}): expected "
                      f"{best['expected_accuracy']:.2%} (target {target:.1%}), projected {best['projected_s']:.0f} s "
                      f"for {best['epochs_trained']} epochs, the soonest of {len(usable)} that reach the target"}


def closest(weighed: list[dict], ranks: int, weak: int, batch_size: int, recipe: str, target: float) -> dict:
    """No candidate reaches the target with a measured time on these ranks: the one the basis expects
    the most of, rather than weak scaling's larger (perhaps unmeasured) batch; weak scaling if the
    basis covers none at ranks no larger than it measured (train.batch_size). Short of the target
    unless that one reaches it (its per-rank batch outside the throughput curve)."""
    measured = [r for r in weighed if r["expected_accuracy"] is not None and r["per_rank"] <= batch_size]
    head = f"no global batch of the {recipe} basis reaches {target:.1%} on {ranks} ranks"
    if not measured:
        if any(r["expected_accuracy"] is not None for r in weighed):     # measured, but only as smaller ranks
            head = (f"the {recipe} basis measured ranks of {batch_size}, and each of its global batches "
                    f"would make {ranks} rank{'s' if ranks > 1 else ''} larger")
        for r in weighed:
            if r["global_batch"] == weak:
                r.pop("rejected", None)
        return {"global_batch": None, "mode": "weak", "candidates": weighed,
                "reason": f"{head}: weak scaling, train.batch_size {batch_size} per rank"}
    best = max(measured, key=lambda r: (r["expected_accuracy"], -r["global_batch"]))
    best.pop("rejected", None)
    short = best["expected_accuracy"] < target
    if not short:
        head = (f"no global batch of the {recipe} basis that {ranks} ranks can split (at least {MIN_RANK_BATCH} images "
                f"each) is expected to clear {target:.1%} by {MARGIN * 100:.2f} points at a measured throughput")
    return {"global_batch": best["global_batch"], **taken(best, weak),
            "candidates": weighed, **({"short_of_target": True} if short else {}),
            "reason": f"{head}: {best['global_batch']} ({split_text(best, batch_size)}), "
                      f"the {'closest' if short else 'most accurate'}: "
                      f"expected {best['expected_accuracy']:.2%}"}
