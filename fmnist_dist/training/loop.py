"""The training job, one process per rank. Read `train` top to bottom: it is the whole story.

Horovod's idioms come in their canonical order, each tagged [hvd] with its reason: init, threads
per rank, the learning rate scaled by the world size, DistributedOptimizer, the broadcast of the
initial state, metric averaging, output from rank 0 only. Import this module only after
`runtime.prepare` (TensorFlow reads its threading and oneDNN variables when it loads).
"""
from __future__ import annotations

import functools
import hashlib
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NoReturn

import numpy as np
import tensorflow as tf

from .. import config as config_mod
from .. import data as data_mod
from .. import basis, environment, lease, preflight, scaling
from ..config import describe_layers
from ..errors import CheckpointError, DivergenceError, FmnistError, ReportError, ReportWriteError, RunDirError
from ..files import now_iso
from ..reporting import report as report_mod
from ..reporting.schema import SCHEMA, SCHEMA_VERSION, Report, Segment
from ..reporting.tensorboard import TensorBoardWriter
from ..scaling import BatchPlan, plan_batches
from ..timing import recorder
from . import checkpoint, optim, rundir, runtime, watchdog
from .callbacks import ProgressMarks, StepControl, StepTimer, StopFlag, barrier
from .model import build_and_compile, flops_per_image, whitening_images
from .pipeline import evaluate, make_batches
from .rundir import RunState

EXIT_PREEMPTED = 75   # EX_TEMPFAIL: stopped cleanly and checkpointed; requeue to resume


class Preempted(Exception):
    """Training stopped cleanly (signal or time limit) after writing a checkpoint."""

    def __init__(self, reason: str, run_dir: str):
        super().__init__(reason)
        self.reason, self.run_dir = reason, run_dir


def train(cfg: dict, run_dir: str, overwrite: bool = False, resume: bool = False,
          changes: dict | None = None) -> dict | None:
    """Train with the resolved config; rank 0 writes into run_dir and returns the final report
    (other ranks return None). Raises Preempted after a clean, checkpointed stop. `changes` are the
    config keys a resume changes deliberately ({key: [before, after]}, from --allow-change)."""
    started, stop = now_iso(), StopFlag.install()              # SIGTERM/SIGUSR1 from here on
    ns, changes = config_mod.namespace(cfg), changes or {}

    # 1. Runtime. [hvd] init; one intra-op pool per rank, sized to its own cores; the precision
    #    every rank agrees on (the least capable CPU decides); the stall watchdog, outside Horovod.
    rt = runtime.start(ns, towers=functools.partial(towers_per_process, ns, cfg))
    choice = choose_global_batch(ns, cfg, rt.size, rt.hvd.cross_size(), rt.trains_in, announce=rt.rank == 0)
    check_towers(rt, ns, plan_batches(ns.train, rt.size, *chosen(choice)))   # a batch that does not split fails here
    stalled = StallRecord.watch(rt, ns, run_dir)

    # 2. Data and run directory. A failure on any rank fails them all, so none waits in a collective.
    t0 = time.perf_counter()
    dataset = agree(rt, lambda: data_mod.load_fashion_mnist(
        ns.data.dir, ns.data.download, ns.data.cache_dir, ns.data.url, progress=rt.rank == 0))
    resuming = agree(rt, lambda: rt.rank == 0 and rundir.prepare(run_dir, overwrite, resume, cfg))
    resuming = rt.hvd_tf.broadcast_object(resuming, root_rank=0)   # [hvd] rank 0 alone looked
    data_load_s = time.perf_counter() - t0
    plan = EpochPlan.of(dataset, ns, rt.size, *chosen(choice))

    # 3. Model. [hvd] the learning rate grows with the world size (train.lr_scaling);
    #    DistributedOptimizer averages the gradients of all ranks at every step.
    model, optimizer, schedule = build_and_compile(ns, plan.batches, plan.steps, rt.distributed_optimizer,
                                                   train_images=whitening_images(ns, dataset.x_train, plan.train_idx))

    # 4. State: fresh, or rank 0's newest checkpoint. [hvd] weights and optimizer state are
    #    broadcast from rank 0 before the first step, so every rank starts from the same point.
    state, resumed_from = restore(rt, run_dir, model, optimizer, cfg, plan, changes) if resuming else (RunState(), None)
    rt.hvd_tf.broadcast_variables(model.variables + optimizer.variables(), root_rank=0)
    run = Run(rt, ns, cfg, run_dir, plan, dataset, model, optimizer, state, data_load_s=data_load_s, choice=choice)
    run.report, run.segment = new_report(run, started, resumed_from, schedule.peak_lr)
    run.segment["config_changes"] = changes or None             # deliberate, with --allow-change
    stalled.run = run
    run.startup_s = environment.seconds_since_process_start(t0) + time.perf_counter() - t0 - data_load_s
    run.timing = recorder.start(rt, model, run_dir, run.startup_s)   # the allreduce probe (collective)
    run.control = StepControl(rt, stop, ns.train.stop_check_steps, ns.train.time_limit, ns.checkpoint.every_steps,
                              progress=state, per_step=plan.world * plan.batch)
    # [hvd] MetricAverageCallback: the loss and accuracy Keras reports are averaged over the ranks.
    run.callbacks = [rt.hvd.callbacks.MetricAverageCallback(), run.timer, run.control, *run.timing.callbacks(),
                     ProgressMarks()]

    # 5. Epochs, each in one or more fit chunks (a chunk ends early for a stop or a mid-epoch checkpoint).
    stop_reason = None
    try:
        for epoch in range(state.epoch, ns.train.epochs + 1):
            if epoch != state.epoch:
                state.next_epoch(epoch)
            lr = float(schedule(optimizer.iterations))
            while state.position < plan.epoch_samples and not stop_reason:
                fit_chunk(run, epoch)
                stop_reason = run.control.stop_reason
                if not stop_reason and run.control.checkpoint_due and state.position < plan.epoch_samples:
                    save(run, "running")                                     # mid-epoch checkpoint
            if stop_reason and state.position < plan.epoch_samples:         # stopped inside the epoch
                break
            val_accuracy = end_epoch(run, epoch, lr)
            target = ns.train.target_accuracy
            if target is not None and val_accuracy >= target:               # the same on every rank
                stop_reason = f"validation accuracy {val_accuracy:.4f} reached target {target}"
                break
            stop_reason = stop_reason or run.control.agree()            # also: was every loss finite?
            save(run, "running")
            if stop_reason:
                break
    except (CheckpointError, ReportError, RunDirError, KeyboardInterrupt):
        raise                          # the run directory takes no report now: the last one written stands
    except Exception as e:
        fail(run, e)                   # the report says how far it got, and why not further

    # 6. Stopped by a signal or the time limit: checkpoint, partial report, exit 75 to be requeued.
    if stop_reason and not stop_reason.startswith("validation accuracy"):
        run.segment.update(end="preempted", ended=now_iso(), reason=stop_reason)
        run.report["stopped"] = stop_reason
        save(run, "preempted")
        raise Preempted(stop_reason, run_dir)

    # 7. Test: exact accuracy over all 10,000 images; [hvd] rank 0 alone writes the report.
    t_test = time.perf_counter()
    test = evaluate(model, dataset.x_test, dataset.y_test, rt, ns.train.eval_batch_size, ns.train.eval_flip,
                    ns.train.eval_shift)
    return finish(run, test, time.perf_counter() - t_test, stop_reason)


class StallRecord:
    """Rank 0, when the watchdog ends a stalled job: the report says so, and the lease is released.
    Runs on the watchdog's thread while the main thread waits in a collective."""

    def __init__(self, run_dir: str):
        self.run_dir, self.run = run_dir, None

    @classmethod
    def watch(cls, rt: runtime.Runtime, ns: Any, run_dir: str) -> "StallRecord":
        """Start the stall watchdog on every rank; rank 0's records the stall in the report."""
        stalled = cls(run_dir)
        watchdog.start(rt, ns.train.stall_timeout, on_stall=stalled.record if rt.rank == 0 else None)
        return stalled

    def record(self, line: str) -> None:
        if self.run is not None:
            self.run.segment.update(end="stalled", ended=now_iso(), reason=line)
            self.run.report.update(status="failed", error=line, finished=now_iso())
            try:
                rundir.write_report(self.run_dir, self.run.report)
            except RunDirError as e:
                print(f"fmnist-dist: warning: the stall is not recorded in the report: {e}", file=sys.stderr, flush=True)
        lease.release_held()


@dataclass
class EpochPlan:
    """The split of the training images and what one epoch is on this world size.

    An epoch is `steps` global batches of this world size, taken in order from the epoch's order
    (data.epoch_order); the remainder, fewer than one global batch, sits out. A run resumed on another
    number of ranks continues the epoch at the saved position with global batches of the new size, up
    to this epoch size: what is left then, fewer than one new global batch, is dropped in the same
    way (the segment's skipped_examples), and an epoch that already has this many examples ends."""
    train_idx: np.ndarray
    val_idx: np.ndarray
    batch: int              # per process
    world: int              # processes
    steps: int              # per epoch and rank
    epoch_samples: int      # examples one epoch consumes, all ranks together
    batches: BatchPlan      # weak or strong scaling, and the simulated world size

    @classmethod
    def of(cls, dataset: data_mod.FashionMNIST, ns: Any, world: int, chosen: int | None = None,
           chosen_world: int | None = None) -> "EpochPlan":
        batches = plan_batches(ns.train, world, chosen, chosen_world)
        train_idx, val_idx = data_mod.split_train_val(len(dataset.y_train), ns.data.val_size, ns.train.seed)
        steps = data_mod.steps_per_epoch(len(train_idx), world, batches.per_process)
        if ns.train.steps_per_epoch:
            steps = min(steps, ns.train.steps_per_epoch)
        return cls(train_idx, val_idx, batches.per_process, world, steps, steps * batches.global_batch, batches)

    @property
    def global_batch(self) -> int:
        return self.world * self.batch

    def steps_left(self, position: int) -> int:
        """Whole global batches left in the epoch after `position` of its examples."""
        return max(0, self.epoch_samples - position) // self.global_batch

    def schedule_step(self, epoch: int, position: int) -> int:
        """The optimizer's step (the learning-rate schedule's position) at `position` of `epoch`:
        counted back from the epoch's end, so that the steps left end every epoch at epoch x steps
        (a position that is not a whole number of global batches rounds up)."""
        return epoch * self.steps - self.steps_left(position)


@dataclass
class Run:
    """Everything the phases of `train` share: the runtime, the model, the state and the report."""
    rt: Any
    ns: Any
    cfg: dict
    run_dir: str
    plan: EpochPlan
    dataset: data_mod.FashionMNIST
    model: Any
    optimizer: Any
    state: RunState
    report: Report = field(default_factory=dict)     # type: ignore[assignment]  (new_report fills it)
    segment: Segment = field(default_factory=dict)   # type: ignore[assignment]  the last of its segments
    timing: Any = None
    control: Any = None
    timer: StepTimer = field(default_factory=StepTimer)
    callbacks: list = field(default_factory=list)
    tensorboard: TensorBoardWriter | None = None
    startup_s: float = 0.0
    data_load_s: float = 0.0
    choice: dict | None = None     # train.global_batch_size=auto: what the job chose, and why


def restore(rt, run_dir: str, model, optimizer, cfg: dict, plan: EpochPlan, changes: dict) -> tuple[RunState, str]:
    """Rank 0 loads the newest usable checkpoint; every rank gets its state."""
    watchdog.mark("restore")
    state, path = agree(rt, lambda: rundir.restore(run_dir, model, optimizer, cfg, tuple(changes)) if rt.rank == 0
                        else (None, None))
    state, path = rt.hvd_tf.broadcast_object((state, path), root_rank=0)
    # The schedule counts steps of this world size (perhaps not the checkpoint's): continue at the
    # step of this epoch and position, not at examples seen / global batch (earlier epochs may have
    # had another size).
    optimizer.iterations.assign(plan.schedule_step(state.epoch, state.position))
    for earlier in state.segments:
        if earlier["end"] == "running":                      # it died without a clean stop
            earlier["end"] = "interrupted"
    return state, path


def fit_chunk(run: Run, epoch: int) -> None:
    """Train from the state's position to the epoch's end, or until a stop or checkpoint is due."""
    rt, plan, state, t = run.rt, run.plan, run.state, run.ns.train
    per_step = plan.global_batch
    steps_left = plan.steps_left(state.position)
    if not steps_left:
        skip_leftover(run, epoch)
        return
    t_data = time.perf_counter()
    shard = data_mod.epoch_shard(plan.train_idx, epoch, t.seed, rt.rank, plan.world, plan.batch,
                                 start=state.position, max_steps=steps_left)
    mirrored = (data_mod.alternating_flips(shard, len(run.dataset.x_train), t.seed, epoch)
                if t.augment_flip and t.alternate_flips else None)
    batches = make_batches(run.dataset.x_train[shard], run.dataset.y_train[shard], t, plan.batch, epoch, rt.rank,
                           first_batch=state.position // per_step, mirrored=mirrored)
    data_s = time.perf_counter() - t_data
    t_fit = time.perf_counter()
    history = run.model.fit(batches, initial_epoch=epoch - 1, epochs=epoch, steps_per_epoch=steps_left,
                            callbacks=run.callbacks, verbose=0)
    fit_s = time.perf_counter() - t_fit
    wait_s = barrier(rt)
    chunk = {k: float(history.history[k][-1]) for k in ("loss", "accuracy")}
    earlier = state.train_metrics if state.position else None      # this epoch's earlier chunks
    state.train_metrics = epoch_mean(earlier, chunk, run.timer.steps * per_step)
    state.position += run.timer.steps * per_step
    state.samples_done += run.timer.steps * per_step
    run.segment["training_s"] += data_s + fit_s + wait_s
    record = rank_record(rt, data_s=data_s, step_s=run.timer.step_s, fit_s=fit_s, wait_s=wait_s,
                         steps=run.timer.steps, samples=run.timer.steps * plan.batch)
    state.partial = merge_records(state.partial, rt.hvd_tf.allgather_object(record))


def epoch_mean(earlier: dict | None, chunk: dict, examples: int) -> dict:
    """The epoch's training loss and accuracy over its fit chunks so far. Keras averages over one fit
    call, and an epoch interrupted, resumed or checkpointed mid-way is several: weigh them by examples."""
    if not earlier or "examples" not in earlier:
        return {**chunk, "examples": examples}
    total = earlier["examples"] + examples
    return {**{k: (earlier[k] * earlier["examples"] + chunk[k] * examples) / total for k in chunk}, "examples": total}


def skip_leftover(run: Run, epoch: int) -> None:
    """Fewer examples than one global batch are left in the epoch (after a resume on another number
    of ranks): they are dropped, as every epoch's remainder is, and the epoch ends."""
    skipped = run.plan.epoch_samples - run.state.position
    run.state.position = run.plan.epoch_samples
    run.segment["skipped_examples"] += skipped
    if run.rt.rank == 0:
        print(f"epoch {epoch}: the last {skipped} examples of the epoch are fewer than one global batch "
              f"({run.plan.global_batch}) of {run.plan.world} rank(s): skipped", flush=True)


def rank_record(rt: runtime.Runtime, **seconds_and_counts: float) -> dict:
    """One rank's record of a fit chunk or an evaluation; what it did not do counts zero."""
    return {"rank": rt.rank, "host": rt.host, "data_s": 0.0, "step_s": 0.0, "fit_s": 0.0, "wait_s": 0.0,
            "eval_s": 0.0, "steps": 0, "samples": 0, **seconds_and_counts}


def end_epoch(run: Run, epoch: int, lr: float) -> float:
    """Validation, the epoch's summary in the report (rank 0); returns the validation accuracy."""
    rt, ns, state = run.rt, run.ns, run.state
    watchdog.mark("validation", f"epoch {epoch}")
    t_eval = time.perf_counter()
    x, y = run.dataset.x_train[run.plan.val_idx], run.dataset.y_train[run.plan.val_idx]
    # Without train.eval_shift's views: 9x the cost at every epoch, for a figure that steers nothing.
    val = evaluate(run.model, x, y, rt, ns.train.eval_batch_size, ns.train.eval_flip)
    eval_s = time.perf_counter() - t_eval
    # A full record: a rank that joined after a resume may have trained none of this epoch.
    records = merge_records(state.partial, rt.hvd_tf.allgather_object(rank_record(rt, eval_s=eval_s)))
    metrics = {"lr": lr, "train_loss": state.train_metrics["loss"], "train_accuracy": state.train_metrics["accuracy"],
               "val_loss": val["loss"], "val_accuracy": val["accuracy"]}
    state.next_epoch(epoch + 1)
    if rt.rank == 0:
        epochs = [e for e in run.report["epochs"] if e["epoch"] != epoch]
        run.report["epochs"] = epochs + [report_mod.epoch_summary(epoch, run.timing.split(epoch, records), metrics)]
        update_timing(run)
        run.timing.after_epoch(run.report)
        if ns.report.tensorboard:
            run.tensorboard = run.tensorboard or TensorBoardWriter(run.run_dir)
            run.tensorboard.epoch(run.report)
        print(epoch_line(run.report["epochs"][-1], ns.train.epochs), flush=True)
    state.epochs = run.report["epochs"]
    return val["accuracy"]


def save(run: Run, status: str) -> None:
    """Rank 0 writes the checkpoint, then the report; every rank learns if it failed. Never after a
    non-finite loss: the ranks agree on that first (DivergenceError on every rank)."""
    run.control.check_finite()
    watchdog.mark("checkpoint", f"epoch {run.state.epoch}")

    def write():
        if run.rt.rank != 0:
            return
        record_code_versions(run)
        run.state.epochs, run.state.segments = run.report["epochs"], run.report["segments"]
        t_save = time.perf_counter()
        rundir.save(run.run_dir, run.model, run.optimizer, run.state, run.cfg, run.plan.world, run.ns.checkpoint.keep)
        run.state.segments = run.report["segments"][:-1]      # the earlier ones; this one is run.segment
        if run.report["epochs"] and run.state.position == 0:   # the checkpoint of the epoch just ended
            rank0 = run.report["epochs"][-1]["ranks"][0]
            rank0["checkpoint_s"] = rank0.get("checkpoint_s", 0.0) + time.perf_counter() - t_save
        run.report["status"] = status
        update_timing(run)
        if run.tensorboard is not None:
            run.tensorboard.check()                           # the epoch's scalars, written by end_epoch
        rundir.write_report(run.run_dir, run.report)
    agree(run.rt, write)


def fail(run: Run, error: Exception) -> NoReturn:
    """The run failed: rank 0's report says so; raises the error (on rank 0, a non-finite loss with
    the last good checkpoint named)."""
    raised = report_failure(run, error) if run.rt.rank == 0 else error
    if isinstance(error, DivergenceError):
        # Every rank raised it at the same agreed step. None exits before rank 0 has written the
        # report: a launcher ends every rank as soon as one exits.
        barrier(run.rt)
    if raised is error:
        raise error
    raise raised from None


def report_failure(run: Run, error: Exception) -> Exception:
    """Rank 0: the report says the run failed, why, and (a non-finite loss) where and which checkpoint
    is the last good one; returns the error to raise."""
    if isinstance(error, DivergenceError):
        found = checkpoint.list_checkpoints(run.run_dir)
        last = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint had been written before it"
        error = DivergenceError(f"{error}; {last}", where=error.where)
        run.report["failure"] = {"reason": f"the training loss became {error.where['loss']}", **error.where}
    record_code_versions(run)
    run.segment.update(end="failed", ended=now_iso(), reason=str(error))
    run.report.update(status="failed", error=f"{type(error).__name__}: {error}", finished=now_iso())
    try:
        rundir.write_report(run.run_dir, run.report)
    except (ReportError, RunDirError) as e:
        print(f"fmnist-dist: warning: the report of this failure could not be written: {e}", file=sys.stderr,
              flush=True)
    return error


def record_code_versions(run: Run) -> None:
    """Rank 0, before the segment's record is first written: the code that runs it and, on a resume,
    the code that wrote its checkpoint (checkpoint.load_latest warned if they differ)."""
    if "code_version" not in run.segment:
        run.segment["code_version"] = checkpoint.code_version()
        if run.segment.get("resumed_from"):
            run.segment["checkpoint_code_version"] = checkpoint.written_by(run.segment["resumed_from"])


def finish(run: Run, test: dict, test_eval_s: float, stop_reason: str | None) -> dict | None:
    """Rank 0 writes the results, the final timing split, the report, TensorBoard and plots, and
    returns the report (other ranks None); every rank learns if a file could not be written."""
    def write():
        if run.rt.rank == 0:
            write_final_report(run, test, test_eval_s, stop_reason)
    agree(run.rt, write)
    return run.report if run.rt.rank == 0 else None


def write_final_report(run: Run, test: dict, test_eval_s: float, stop_reason: str | None) -> None:
    """Rank 0: the report first (the results are safe whatever follows), then TensorBoard and plots."""
    report, target = run.report, run.ns.train.target_accuracy
    last = report["epochs"][-1]
    report["results"] = {
        "val_accuracy": last["val_accuracy"], "val_loss": last["val_loss"],
        "test_accuracy": test["accuracy"], "test_loss": test["loss"],
        "test_correct": test["correct"], "test_total": test["total"],
        "eval_flip": run.ns.train.eval_flip, "eval_shift": run.ns.train.eval_shift,
        "test_accuracy_one_view": test["one_view_accuracy"],
        "target_accuracy": target,
        "target_reached_epoch": next((e["epoch"] for e in report["epochs"]
                                      if target is not None and e["val_accuracy"] >= target), None),
        "stopped_early": stop_reason,
        "weights_sha256": weights_digest(run.model),   # equal digests: the same training, bit for bit
    }
    update_timing(run, test_eval_s)
    run.segment.update(end="completed", ended=now_iso())
    report.update(status="completed", finished=now_iso())
    run.timing.finish(report)
    if run.ns.report.tensorboard:
        run.tensorboard = run.tensorboard or TensorBoardWriter(run.run_dir)
        run.tensorboard.final(report)
    rundir.write_report(run.run_dir, report)
    try:
        if run.tensorboard is not None:
            run.tensorboard.check()
        if run.ns.report.plots:
            write_plots(report, run.run_dir)
    except ReportWriteError as e:
        raise ReportWriteError(f"{e}; the run itself finished, its report is complete in "
                               f"{os.path.join(run.run_dir, 'report.md')}") from None


def new_report(run: Run, started: str, resumed_from: str | None,
               peak_lr: float) -> tuple[Report, Segment]:
    """The report as it starts (every rank builds it; rank 0 writes it) and this start's segment."""
    rt, ns, plan, state = run.rt, run.ns, run.plan, run.state
    first_shard = data_mod.epoch_shard(plan.train_idx, 1, ns.train.seed, rt.rank, plan.world, plan.batch,
                                       max_steps=plan.steps)
    world = describe_world(rt, plan.steps * plan.batch, weights_digest(run.model), data_mod.index_digest(first_shard))
    segment = {"segment": len(state.segments) + 1, "started": started, "world_size": plan.world,
               "hosts": sorted(world["hosts"]), "resumed_from": resumed_from,
               "start_epoch": state.epoch, "start_position": state.position, "skipped_examples": 0,
               "start_step": int(run.optimizer.iterations.numpy()), "peak_lr": peak_lr,
               "precision": rt.environment["precision"]["chosen"], "training_s": 0.0, "ended": None, "end": "running"}
    if resumed_from:
        announce_resume(rt, state, segment, resumed_from)
    model = run.model
    report = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "run_id": os.path.basename(os.path.abspath(run.run_dir)), "status": "running", "error": None,
        "started": state.segments[0]["started"] if state.segments else started, "finished": None,
        "config": run.cfg, "environment": rt.environment, "world": world,
        "data": {"source": run.dataset.source, "train_size": len(plan.train_idx), "val_size": len(plan.val_idx),
                 "test_size": len(run.dataset.y_test), "steps_per_epoch": plan.steps,
                 "batch_size_per_rank": plan.batches.per_rank, "global_batch_size": plan.batches.global_batch,
                 "scaling": {**plan.batches.describe(), **optim.recipe(ns.train, plan.batches),
                             "choice": run.choice,
                             "accuracy_basis": basis.launch_check(run.cfg, plan.batches.global_batch)}},
        "model": {"layers": ns.model.layers, "description": describe_layers(ns.model.layers),
                  "parameters": int(model.count_params()),
                  "trainable_parameters": int(sum(v.shape.num_elements() for v in model.trainable_variables)),
                  "batch_norm": any(layer["type"] == "batchnorm" for layer in ns.model.layers),
                  "flops_per_image": flops_per_image(model)},
        "segments": state.segments + [segment], "epochs": state.epochs, "timing": {}, "results": {},
        "preflight": preflight.read(run.run_dir) if rt.rank == 0 else None,
    }
    scale_warning = report["data"]["scaling"]["accuracy_basis"]["warning"]
    if scale_warning and rt.rank == 0:
        print(f"fmnist-dist: warning: {scale_warning}", file=sys.stderr, flush=True)
    return report, segment


def choose_global_batch(ns: Any, cfg: dict, size: int, nodes: int, precision: str,
                        announce: bool = False) -> dict | None:
    """train.global_batch_size=auto: the global batch `size` processes on `nodes` nodes reach the
    recipe's target soonest with (scaling.choose), training in `precision` ("bf16" or "fp32"). Every
    rank computes it from the same inputs, so all agree; rank 0 announces it."""
    if ns.train.global_batch_size != "auto":
        return None
    recipe_basis = basis.for_config(cfg)
    ranks = ns.train.simulate_world_size or size
    gradient_bytes = config_mod.trainable_parameters(ns.model.layers, ns.model.first_conv_frozen) * scaling.GRADIENT_BYTES_PER_WEIGHT
    choice = scaling.choose(ranks, nodes, vars(ns.train), recipe_basis, precision, gradient_bytes,
                            data_mod.SHAPES["train_images"][0] - ns.data.val_size, basis.target_of(cfg, recipe_basis))
    if announce:
        print(f"fmnist-dist: global batch (auto, {ranks} ranks on {nodes} node(s)): {choice['reason']}"
              + ("" if recipe_basis else f" ({basis.missing_line(cfg)})"), flush=True)
        for c in choice["candidates"]:
            if c.get("rejected"):
                print(f"fmnist-dist:   not {c['global_batch']} ({scaling.rank_text(c)}): {c['rejected']}", flush=True)
    return choice


def towers_per_process(ns: Any, cfg: dict, size: int, nodes: int, precision: str) -> int:
    """The simulated ranks each of `size` processes will carry (runtime.start sizes threads by it)."""
    return plan_batches(ns.train, size, *chosen(choose_global_batch(ns, cfg, size, nodes, precision))).ranks_per_process


def check_towers(rt: runtime.Runtime, ns: Any, batches: BatchPlan) -> None:
    """Rank 0 says so when the threads were sized for another number of simulated ranks per process
    than the job carries (a node whose CPU the others' outvoted on precision, an unknown launcher):
    the run is right, but slower than it could be."""
    if ns.intel.inter_op_threads == 0 and batches.ranks_per_process != rt.towers and rt.rank == 0:
        print(f"fmnist-dist: warning: threads were sized for {rt.towers} simulated rank(s) per process before "
              f"the ranks' CPUs and sizes were known, and each process carries {batches.ranks_per_process}: "
              f"set intel.inter_op_threads and intel.intra_op_threads to choose", flush=True)


def chosen(choice: dict | None) -> tuple[int | None, int | None]:
    """The global batch auto chose and the ranks it simulates (plan_batches' chosen, chosen_world)."""
    return (choice["global_batch"], choice.get("simulated_world")) if choice else (None, None)


def announce_resume(rt, state: RunState, segment: dict, resumed_from: str) -> None:
    """Say where the run continues, and what changed since the last segment (rank 0)."""
    last = state.segments[-1] if state.segments else {}
    if last.get("world_size") not in (None, segment["world_size"]):
        segment["note"] = (f"resumed on {segment['world_size']} ranks (was {last['world_size']}): "
                           f"data re-sharded, learning rate rescaled to {segment['peak_lr']:g}")
    if rt.rank != 0:
        return
    if last.get("precision") not in (None, segment["precision"]):
        print(f"fmnist-dist: warning: this segment trains in {segment['precision']}, the run so far in "
              f"{last['precision']} ({rt.environment['precision']['reason']})", file=sys.stderr, flush=True)
    print(f"resuming from {resumed_from}: epoch {state.epoch}, example {state.position} of the epoch"
          + (f"; {segment['note']}" if "note" in segment else ""), flush=True)


def update_timing(run: Run, test_eval_s: float = 0.0) -> None:
    """The report's timing section from the epochs so far (rank 0)."""
    timing = report_mod.timing_summary(run.report["epochs"], run.ns.train.target_accuracy)
    timing["evaluation_s"] += test_eval_s
    timing.update(startup_s=run.startup_s, data_load_s=run.data_load_s,
                  total_s=run.startup_s + timing["training_s"] + timing["evaluation_s"])
    run.report["timing"] = timing


def write_plots(report: Report, run_dir: str) -> None:
    """A plot file that cannot be written is an error (ReportWriteError, naming it and how to draw
    the plots again); a failure of the plotting itself is a warning: the report stands regardless."""
    try:
        from ..reporting import plots   # matplotlib, only where plots are wanted
        plots.plot_run(report, run_dir)
    except ReportWriteError as e:
        raise ReportWriteError(f"{e} (to draw the plots again: fmnist-dist report {run_dir} --plots {run_dir})") from None
    except Exception as e:  # noqa: BLE001
        print(f"fmnist-dist: warning: could not write plots: {e}", flush=True)


def agree(rt: runtime.Runtime, action: Callable) -> Any:
    """Run action on this rank; if it fails on any rank, raise on every rank (no rank is left
    waiting in a collective for one that already gave up)."""
    error = result = None
    try:
        result = action()
    except FmnistError as e:
        error = e
    watchdog.mark("waiting for the other ranks", waiting=True)     # not the one the others wait for
    failures = rt.hvd_tf.allgather_object(None if error is None else (type(error).__name__, str(error)))
    failures = [f for f in failures if f]
    if error is not None:
        raise error
    if failures:
        kind, message = failures[0]
        raise error_class(kind)(message)
    return result


def error_class(name: str) -> type:
    """The FmnistError subclass of that name (another rank's error, raised again here)."""
    classes, found = [FmnistError], {}
    while classes:
        cls = classes.pop()
        found[cls.__name__] = cls
        classes.extend(cls.__subclasses__())
    return found.get(name, FmnistError)


def merge_records(earlier: list[dict] | None, later: list[dict]) -> list[dict]:
    """Per-rank records of one epoch added up across chunks (and across segments after a resume)."""
    merged = {r["rank"]: dict(r) for r in earlier or []}
    for r in later:
        into = merged.setdefault(r["rank"], {})
        for key, value in r.items():
            into[key] = value if key in ("rank", "host") else into.get(key, 0) + value
    return [merged[k] for k in sorted(merged)]


def describe_world(rt: runtime.Runtime, shard_size: int, weights_sha: str, shard_sha: str) -> dict:
    me = {"rank": rt.rank, "host": rt.host, "local_rank": rt.local_rank, "pid": os.getpid(),
          "threads": rt.threads, "cpu_affinity": sorted(os.sched_getaffinity(0)),
          "shard_size": shard_size, "epoch1_shard_sha256": shard_sha, "initial_weights_sha256": weights_sha}
    ranks = sorted(rt.hvd_tf.allgather_object(me), key=lambda r: r["rank"])
    hosts: dict[str, list[int]] = {}
    for r in ranks:
        hosts.setdefault(r["host"], []).append(r["rank"])
    return {"size": rt.size, "hosts": hosts, "ranks": ranks}


def weights_digest(model: tf.keras.Model) -> str:
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()


def epoch_line(e: dict, epochs: int) -> str:
    return (f"epoch {e['epoch']}/{epochs}  loss {e['train_loss']:.4f}  acc {e['train_accuracy']:.4f}  "
            f"val_loss {e['val_loss']:.4f}  val_acc {e['val_accuracy']:.4f}  lr {e['lr']:.2e}  "
            f"{e['training_s']:.1f} s  {e['images_per_s']:.0f} img/s")
