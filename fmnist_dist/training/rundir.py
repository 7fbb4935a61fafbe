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
from .. import lease
from ..errors import ConfigError, RunDirError
from ..files import atomic_write
from ..reporting import report as report_mod
from . import checkpoint

RESUME_FREE = config_mod.EXPERIMENT_NEUTRAL   # a resumed run may change these; every other key needs --allow-change



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


def result_changes(before: dict, after: dict) -> dict[str, list]:
    """Keys outside RESUME_FREE whose values differ: {key: [before, after]}."""
    old, new = config_mod.flat(before), config_mod.flat(after)
    return {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new))
            if not k.startswith(RESUME_FREE) and old.get(k) != new.get(k)}


def will_resume(run_dir: str, overwrite: bool) -> bool:
    """Whether `train` continues the run in run_dir (an unfinished run with a checkpoint)."""
    return (not overwrite and bool(checkpoint.list_checkpoints(run_dir))
            and report_mod.report_status(run_dir) != "completed")


def why_not_resumable(run_dir: str) -> str:
    if not os.path.isdir(run_dir):
        return "no such run directory"
    if report_mod.report_status(run_dir) == "completed":
        return "holds a finished run (nothing to resume)"
    return f"nothing to resume: no checkpoint in {checkpoint.checkpoint_root(run_dir)}"


def resume_config(run_dir: str, config_path: str | None, overrides: list[str],
                  allowed: list[str]) -> tuple[dict, dict, list[str]]:
    """The config a resumed run continues with: the run's own RUN_DIR/config.yaml (a requeued job
    must not pick up later edits of the repository's config), with the RESUME_FREE keys and the
    --allow-change keys as asked now. Returns (cfg, the deliberate changes, warnings).

    A --set of a result key without --allow-change is refused (ConfigError naming each key); a
    config file that now differs is ignored with a warning naming the keys."""
    run_config = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(run_config):
        raise RunDirError(f"{run_dir}: holds checkpoints but no config.yaml ({run_config}); the run's "
                          f"configuration is unknown, so it cannot be resumed exactly")
    started_with = config_mod.load(run_config)
    requested = config_mod.load(config_path or run_config, overrides)
    unknown = [k for k in allowed if k not in config_mod.flat(started_with)]
    if unknown:
        raise ConfigError(f"--allow-change {unknown[0]}: unknown key")
    changes = result_changes(started_with, requested)
    set_keys = {item.split("=", 1)[0].strip() for item in overrides}
    refused = {k: v for k, v in changes.items() if k in set_keys and k not in allowed}
    if refused:
        details = "; ".join(f"{k}: the run has {a!r}, --set asks {b!r}" for k, (a, b) in refused.items())
        raise ConfigError(f"{run_dir}: cannot resume with {', '.join(refused)} changed ({details}): it would "
                          f"be another experiment. To change it deliberately add --allow-change KEY (the "
                          f"report records it), or start a new --run-dir")
    ignored = sorted(k for k in changes if k not in allowed)
    warnings = [f"resuming {run_dir} with the configuration it started with ({run_config}); "
                f"{config_path} now differs in {', '.join(ignored)}: ignored (to change a key deliberately: "
                f"--set KEY=VALUE --allow-change KEY)"] if ignored else []
    cfg = config_mod.load(run_config)
    flat_requested = config_mod.flat(requested)
    for key in config_mod.flat(cfg):
        if key.startswith(RESUME_FREE) or key in allowed:
            section, name = key.split(".", 1)
            cfg[section][name] = flat_requested[key]
    return cfg, {k: v for k, v in changes.items() if k in allowed}, warnings


def prepare(run_dir: str, overwrite: bool, resume: bool, cfg: dict) -> bool:
    """Take the run directory's writer lease and make it ready; returns True when the run
    continues from its checkpoint.

    A finished run is refused unless overwrite. An unfinished run with a checkpoint is resumed (also
    without --resume: that is how a requeued job continues) and keeps its config.yaml. An earlier
    attempt that never wrote a checkpoint keeps its report under report.attempt-N.json."""
    lease.hold(run_dir)
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
        checkpoint.clear_leftovers(run_dir)   # what a killed writer left half-written (we hold the lease)
        if not has_checkpoint:             # a resumed run's config.yaml changes only after restore
            atomic_write(os.path.join(run_dir, "config.yaml"), config_mod.dump(cfg))
    except OSError as e:
        raise RunDirError(f"{run_dir}: cannot write the run directory: {e.strerror or e}") from None
    return has_checkpoint


def restore(run_dir: str, model, optimizer, cfg: dict, allowed: tuple = ()) -> tuple[RunState, str]:
    """Load the newest usable checkpoint (rank 0) after checking that the config still fits it
    (every result key, except those changed deliberately); then config.yaml records the config."""
    saved, path = checkpoint.load_latest(run_dir, model, optimizer)
    changed = {k: v for k, v in result_changes(saved["config"], cfg).items() if k not in allowed}
    if changed:
        details = "; ".join(f"{k}: checkpoint has {a!r}, config has {b!r}" for k, (a, b) in changed.items())
        raise RunDirError(f"{run_dir}: cannot resume with a changed {', '.join(changed)} ({details}); "
                          f"start a new --run-dir instead")
    try:
        atomic_write(os.path.join(run_dir, "config.yaml"), config_mod.dump(cfg))
    except OSError as e:
        raise RunDirError(f"{run_dir}: cannot write config.yaml: {e.strerror or e}") from None
    return RunState.from_checkpoint(saved), path


def save(run_dir: str, model, optimizer, state: RunState, cfg: dict, world_size: int, keep: int) -> None:
    """Rank 0: a checkpoint of the model, the optimizer and the run's state (if it still holds the
    run directory's lease)."""
    lease.check_held()
    checkpoint.save(run_dir, model, optimizer, {**asdict(state), "config": cfg, "world_size": world_size}, keep)


def write_report(run_dir: str, report: dict) -> None:
    """Rank 0: the report (if it still holds the run directory's lease; it may have been lost since
    the checkpoint just written)."""
    lease.check_held()
    report_mod.write_report(run_dir, report)
