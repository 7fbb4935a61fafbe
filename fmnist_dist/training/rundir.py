"""The run directory: where a run is (RunState), getting the directory ready, and resuming from it.

Rank 0 alone reads and writes the directory; the training loop broadcasts what it found.
"""
from __future__ import annotations

import os
import shutil
import socket
from dataclasses import asdict, dataclass, field
from datetime import datetime

from .. import config as config_mod
from ..errors import RunDirError
from ..files import atomic_write
from ..reporting import report as report_mod
from . import checkpoint

# Changing these between segments would silently make a different experiment.
RESUME_INCOMPATIBLE = ("model.layers", "data.val_size", "train.seed", "train.batch_size", "train.optimizer",
                       "intel.mixed_precision")



@dataclass
class RunState:
    """Where the run is and what it has done: saved in every checkpoint, restored on resume."""
    epoch: int = 1                         # the epoch in progress
    position: int = 0                      # examples of that epoch already trained, all ranks together
    samples_done: int = 0                  # examples trained since the run began (names the checkpoint)
    partial: list | None = None            # per-rank records of the epoch's fit chunks so far
    train_metrics: dict | None = None      # loss and accuracy at the end of the last chunk
    epochs: list = field(default_factory=list)     # the report's epoch summaries so far
    segments: list = field(default_factory=list)   # one per start or resume, the current one last

    def next_epoch(self, epoch: int) -> None:
        self.epoch, self.position, self.partial = epoch, 0, None

    @classmethod
    def from_checkpoint(cls, saved: dict) -> "RunState":
        return cls(**{name: saved[name] for name in cls.__dataclass_fields__})


def default_run_dir(config_path: str | None) -> str:
    name = os.path.splitext(os.path.basename(config_path))[0] if config_path else "default"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{stamp}-{name}-{socket.gethostname()}")


def prepare(run_dir: str, overwrite: bool, resume: bool, cfg: dict) -> bool:
    """Make run_dir ready; returns True when the run continues from its checkpoint.

    A finished run is refused unless overwrite. An unfinished run with a checkpoint is resumed (also
    without --resume: that is how a requeued job continues). An earlier attempt that never wrote a
    checkpoint keeps its report under report.attempt-N.json."""
    status = report_mod.report_status(run_dir)
    report_path = os.path.join(run_dir, "report.json")
    has_checkpoint = bool(checkpoint.list_checkpoints(run_dir))
    try:
        if overwrite:
            for name in report_mod.REPORT_FILES:
                if os.path.exists(os.path.join(run_dir, name)):
                    os.unlink(os.path.join(run_dir, name))
            shutil.rmtree(checkpoint.checkpoint_root(run_dir), ignore_errors=True)
            status, has_checkpoint = None, False
        elif status == "completed":
            raise RunDirError(f"{run_dir}: already holds a finished run ({report_path}); choose another "
                              f"--run-dir, or pass --overwrite to replace it")
        elif resume and not has_checkpoint:
            raise RunDirError(f"{run_dir}: nothing to resume: no checkpoint in {checkpoint.checkpoint_root(run_dir)}")
        elif status is not None and not has_checkpoint:
            attempt = 1
            while os.path.exists(os.path.join(run_dir, f"report.attempt-{attempt}.json")):
                attempt += 1
            os.replace(report_path, os.path.join(run_dir, f"report.attempt-{attempt}.json"))
        os.makedirs(run_dir, exist_ok=True)
        atomic_write(os.path.join(run_dir, "config.yaml"), config_mod.dump(cfg))
    except OSError as e:
        raise RunDirError(f"{run_dir}: cannot write the run directory: {e.strerror or e}") from None
    return has_checkpoint


def restore(run_dir: str, model, optimizer, cfg: dict) -> tuple[RunState, str]:
    """Load the newest usable checkpoint (rank 0) after checking the config still fits it."""
    saved, path = checkpoint.load_latest(run_dir, model, optimizer)
    before, now = config_mod.flat(saved["config"]), config_mod.flat(cfg)
    changed = [k for k in RESUME_INCOMPATIBLE if before.get(k) != now.get(k)]
    if changed:
        details = "; ".join(f"{k}: checkpoint has {before.get(k)!r}, config has {now.get(k)!r}" for k in changed)
        raise RunDirError(f"{run_dir}: cannot resume with a changed {', '.join(changed)} ({details}); "
                          f"start a new --run-dir instead")
    return RunState.from_checkpoint(saved), path


def save(run_dir: str, model, optimizer, state: RunState, cfg: dict, world_size: int, keep: int) -> None:
    """Rank 0: a checkpoint of the model, the optimizer and the run's state."""
    checkpoint.save(run_dir, model, optimizer, {**asdict(state), "config": cfg, "world_size": world_size}, keep)
