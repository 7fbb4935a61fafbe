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

from dataclasses import dataclass
from typing import Any

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


def plan_batches(train: Any, processes: int) -> BatchPlan:
    """The split for `processes` real ranks from the train section (a namespace or a dict)."""
    get = train.get if isinstance(train, dict) else lambda key: getattr(train, key)
    simulate, global_batch, batch = get("simulate_world_size"), get("global_batch_size"), get("batch_size")
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
    return BatchPlan(processes, world, global_batch, batch, "strong", large_from)


def _multiples(unit: int, near: int) -> str:
    below, above = near // unit * unit, (near // unit + 1) * unit
    return f"{below} or {above}" if below else str(above)
