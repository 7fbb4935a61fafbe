"""The training job, one process per rank. Read it top to bottom: `train` is the whole story.

Horovod idioms in their canonical order: init, threads, scaled learning rate, DistributedOptimizer,
broadcast of the initial state, metric averaging, output from rank 0 only.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import sys
import time
from datetime import datetime

import numpy as np

from . import checkpoint
from . import config as config_mod
from . import data as data_mod
from . import preflight
from . import report as report_mod
from . import runtime
from . import timing as timing_mod
from .errors import FmnistError
from .files import atomic_write, now_iso


EXIT_PREEMPTED = 75   # EX_TEMPFAIL: stopped cleanly and checkpointed; requeue to resume
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Changing these between segments would silently make a different experiment.
RESUME_INCOMPATIBLE = ("model.layers", "data.val_size", "train.seed", "train.batch_size", "train.optimizer",
                       "intel.mixed_precision")


class RunDirError(FmnistError):
    """The run directory cannot be used (holds a finished run, not writable, ...)."""


class Preempted(Exception):
    """Training stopped cleanly (signal or time limit) after writing a checkpoint."""

    def __init__(self, reason: str, run_dir: str):
        super().__init__(reason)
        self.reason, self.run_dir = reason, run_dir


class StopFlag:
    """Set by SIGTERM/SIGUSR1 (scheduler pre-emption, walltime warning); read at step boundaries."""

    def __init__(self):
        self.signal: str | None = None

    @classmethod
    def install(cls) -> "StopFlag":
        flag = cls()
        for sig in STOP_SIGNALS:
            signal.signal(sig, flag._handle)
        return flag

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name


def train(cfg: dict, run_dir: str, overwrite: bool = False, resume: bool = False) -> dict | None:
    """Train with the resolved config; rank 0 writes into run_dir and returns the final report
    (other ranks return None). Raises Preempted after a clean, checkpointed stop."""
    started = now_iso()
    stop = StopFlag.install()                                 # SIGTERM/SIGUSR1 from here on
    ns = config_mod.namespace(cfg)
    timing_mod.prepare_environment(ns)                        # [timing] HOROVOD_TIMELINE if report.timeline
    rt = runtime.start(ns)                                    # hvd.init + threads + precision
    import tensorflow as tf
    hvd = rt.hvd

    t0 = time.perf_counter()
    dataset = agree(rt, lambda: data_mod.load_fashion_mnist(
        ns.data.dir, ns.data.download, ns.data.cache_dir, ns.data.url, progress=rt.rank == 0))
    resuming = agree(rt, lambda: prepare_run_dir(run_dir, overwrite, resume, cfg) if rt.rank == 0 else None)
    resuming = rt.hvd_tf.broadcast_object(resuming, root_rank=0)
    data_load_s = time.perf_counter() - t0

    batch, world = ns.train.batch_size, rt.size
    train_idx, val_idx = data_mod.split_train_val(len(dataset.y_train), ns.data.val_size, ns.train.seed)
    steps = data_mod.steps_per_epoch(len(train_idx), world, batch)
    if ns.train.steps_per_epoch:
        steps = min(steps, ns.train.steps_per_epoch)
    epoch_samples = steps * world * batch                     # examples one epoch consumes, all ranks

    tf.keras.utils.set_random_seed(ns.train.seed)              # same on every rank: same init
    from .config import describe_layers
    from .model import build_model, flops_per_image
    from .optim import lr_schedule as make_schedule, make_optimizer
    model = build_model(ns.model.layers, ns.train.seed)
    lr_schedule = make_schedule(ns.train, world, steps)
    optimizer = hvd.DistributedOptimizer(make_optimizer(ns.train, lr_schedule))
    model.compile(optimizer=optimizer,
                  loss=tf.keras.losses.CategoricalCrossentropy(from_logits=True,
                                                               label_smoothing=ns.train.label_smoothing),
                  metrics=["accuracy"])
    optimizer.build(model.trainable_variables)
    state = {"epoch": 1, "position": 0, "samples_done": 0, "partial": None, "train_metrics": None,
             "epochs": [], "segments": []}
    resumed_from = None
    if resuming:
        state, resumed_from = agree(rt, lambda: restore(run_dir, model, optimizer, cfg) if rt.rank == 0 else (None, None))
        state, resumed_from = rt.hvd_tf.broadcast_object((state, resumed_from), root_rank=0)
        # The schedule counts steps of this world size: continue from the examples already seen.
        optimizer.iterations.assign(state["samples_done"] // (world * batch))
        for earlier in state["segments"]:
            if earlier["end"] == "running":                  # it died without a clean stop
                earlier["end"] = "interrupted"
    # Broadcast explicitly before the first step (BroadcastGlobalVariablesCallback would do it
    # after the first batch): every rank starts from rank 0's weights, checked by hash below.
    rt.hvd_tf.broadcast_variables(model.variables + optimizer.variables(), root_rank=0)
    weights_sha = weights_digest(model)

    first_shard = data_mod.epoch_shard(train_idx, 1, ns.train.seed, rt.rank, world, batch, max_steps=steps)
    world_info = describe_world(rt, steps * batch, weights_sha, index_digest(first_shard))
    segment = {"segment": len(state["segments"]) + 1, "started": started, "world_size": world,
               "hosts": sorted(world_info["hosts"]), "resumed_from": resumed_from,
               "start_epoch": state["epoch"], "start_position": state["position"],
               "peak_lr": lr_schedule.peak_lr, "precision": rt.environment["precision"]["chosen"],
               "training_s": 0.0, "ended": None, "end": "running"}
    before = state["segments"][-1].get("precision") if state["segments"] else None
    if resumed_from and before and before != segment["precision"]:
        print(f"fmnist-dist: warning: this segment trains in {segment['precision']}, the run so far in "
              f"{before} ({rt.environment['precision']['reason']})", file=sys.stderr, flush=True)
    if resumed_from and state["segments"] and state["segments"][-1]["world_size"] != world:
        segment["note"] = (f"resumed on {world} ranks (was {state['segments'][-1]['world_size']}): "
                           f"data re-sharded, learning rate rescaled to {lr_schedule.peak_lr:g}")
    report = {
        "schema": report_mod.SCHEMA, "schema_version": report_mod.SCHEMA_VERSION,
        "run_id": os.path.basename(os.path.abspath(run_dir)), "status": "running", "error": None,
        "started": state["segments"][0]["started"] if state["segments"] else started, "finished": None,
        "config": cfg, "environment": rt.environment, "world": world_info,
        "data": {"source": dataset.source, "train_size": len(train_idx), "val_size": len(val_idx),
                 "test_size": len(dataset.y_test), "steps_per_epoch": steps,
                 "batch_size_per_rank": batch, "global_batch_size": batch * world},
        "model": {"layers": ns.model.layers, "description": describe_layers(ns.model.layers),
                  "parameters": int(model.count_params()),
                  "trainable_parameters": int(sum(v.shape.num_elements() for v in model.trainable_variables)),
                  "batch_norm": any(layer["type"] == "batchnorm" for layer in ns.model.layers),
                  "flops_per_image": flops_per_image(model)},
        "segments": state["segments"] + [segment], "epochs": state["epochs"], "timing": {}, "results": {},
        "preflight": preflight.read(run_dir) if rt.rank == 0 else None,
    }
    if rt.rank == 0 and resumed_from:
        print(f"resuming from {resumed_from}: epoch {state['epoch']}, example {state['position']} of the epoch"
              + (f"; {segment['note']}" if "note" in segment else ""), flush=True)
    # Start-up: process start to the first step (interpreter, imports, Horovod, model), data loading excluded.
    startup_s = seconds_since_process_start(t0) + time.perf_counter() - t0 - data_load_s

    tm = timing_mod.start(rt, model, ns, run_dir, startup_s)  # [timing] allreduce probe (collective)
    timer = make_step_timer(tf)
    control = make_step_control(tf, rt, stop, ns.train.stop_check_steps, ns.train.time_limit,
                                ns.checkpoint.every_steps)
    callbacks = [hvd.callbacks.MetricAverageCallback(), timer, control, *tm.callbacks()]  # [timing] epoch windows
    target = ns.train.target_accuracy
    stop_reason = None

    def checkpoint_and_report(status: str) -> None:
        """Rank 0 writes the checkpoint, then the report; every rank learns if it failed."""
        def write():
            if rt.rank != 0:
                return
            saved = {**state, "epochs": report["epochs"], "segments": report["segments"],
                     "config": cfg, "world_size": world}
            t_save = time.perf_counter()
            checkpoint.save(run_dir, model, optimizer, saved, ns.checkpoint.keep)
            if report["epochs"] and state["position"] == 0:   # the checkpoint of the epoch just ended
                rank0 = report["epochs"][-1]["ranks"][0]
                rank0["checkpoint_s"] = rank0.get("checkpoint_s", 0.0) + time.perf_counter() - t_save
            report["status"] = status
            finish_timing(report, startup_s, data_load_s, target)
            report_mod.write_report(run_dir, report)
        agree(rt, write)

    def fit_chunk(state: dict, epoch: int):
        """Train from state's position to the epoch's end, or until a stop or checkpoint is due;
        state records where it got to and what it took."""
        start, steps_left = state["position"], (epoch_samples - state["position"]) // (world * batch)
        t_data = time.perf_counter()
        shard = data_mod.epoch_shard(train_idx, epoch, ns.train.seed, rt.rank, world, batch,
                                     start=start, max_steps=steps_left)
        batches = make_batches(tf, dataset.x_train[shard], dataset.y_train[shard], ns.train, epoch,
                               rt.rank, first_batch=start // (world * batch))
        data_s = time.perf_counter() - t_data
        t_fit = time.perf_counter()
        history = model.fit(batches, initial_epoch=epoch - 1, epochs=epoch, steps_per_epoch=steps_left,
                            callbacks=callbacks, verbose=0)
        fit_s = time.perf_counter() - t_fit
        wait_s = barrier(hvd)
        state["position"] += timer.steps * world * batch
        state["samples_done"] += timer.steps * world * batch
        segment["training_s"] += data_s + fit_s + wait_s
        record = {"rank": rt.rank, "host": rt.host, "data_s": data_s, "step_s": timer.step_s, "fit_s": fit_s,
                  "wait_s": wait_s, "eval_s": 0.0, "steps": timer.steps, "samples": timer.steps * batch}
        state["partial"] = merge_records(state["partial"], rt.hvd_tf.allgather_object(record))
        state["train_metrics"] = {k: float(history.history[k][-1]) for k in ("loss", "accuracy")}

    try:
        for epoch in range(state["epoch"], ns.train.epochs + 1):
            if epoch != state["epoch"]:
                state.update(epoch=epoch, position=0, partial=None)
            lr = float(lr_schedule(optimizer.iterations))
            while state["position"] < epoch_samples and not stop_reason:   # one fit per chunk
                fit_chunk(state, epoch)
                if control.stop_reason:
                    stop_reason = control.stop_reason
                elif control.checkpoint_due and state["position"] < epoch_samples:
                    checkpoint_and_report("running")                        # mid-epoch checkpoint
            if stop_reason and state["position"] < epoch_samples:           # stopped inside the epoch
                break

            t_eval = time.perf_counter()
            val = evaluate(model, dataset.x_train[val_idx], dataset.y_train[val_idx], rt, ns.train.eval_batch_size,
                           ns.train.eval_flip)
            eval_s = time.perf_counter() - t_eval
            records = merge_records(state["partial"], rt.hvd_tf.allgather_object({"rank": rt.rank, "eval_s": eval_s}))
            metrics = {"lr": lr,
                       "train_loss": state["train_metrics"]["loss"],
                       "train_accuracy": state["train_metrics"]["accuracy"],
                       "val_loss": val["loss"], "val_accuracy": val["accuracy"]}
            state.update(epoch=epoch + 1, position=0, partial=None)
            if rt.rank == 0:
                report["epochs"] = [e for e in report["epochs"] if e["epoch"] != epoch]
                report["epochs"].append(report_mod.epoch_summary(epoch, tm.split(epoch, records), metrics))  # [timing]
                finish_timing(report, startup_s, data_load_s, target)
                tm.after_epoch(report)                            # [timing] breakdown + TensorBoard
                print(epoch_line(report["epochs"][-1], ns.train.epochs), flush=True)
            state["epochs"] = report["epochs"]
            if target is not None and val["accuracy"] >= target:   # identical on every rank (allreduced)
                stop_reason = f"validation accuracy {val['accuracy']:.4f} reached target {target}"
                break
            stop_reason = stop_reason or agreed_stop(rt, stop, ns.train.time_limit)
            checkpoint_and_report("running")
            if stop_reason:
                break
    except (checkpoint.CheckpointError, KeyboardInterrupt):
        raise
    except Exception as e:
        if rt.rank == 0:
            report.update(status="failed", error=f"{type(e).__name__}: {e}", finished=now_iso())
            segment.update(end="failed", ended=now_iso())
            report_mod.write_report(run_dir, report)
        raise

    if stop_reason and not stop_reason.startswith("validation accuracy"):
        segment.update(end="preempted", ended=now_iso(), reason=stop_reason)
        report["stopped"] = stop_reason
        checkpoint_and_report("preempted")
        raise Preempted(stop_reason, run_dir)

    t_test = time.perf_counter()
    test = evaluate(model, dataset.x_test, dataset.y_test, rt, ns.train.eval_batch_size, ns.train.eval_flip)
    test_eval_s = time.perf_counter() - t_test
    if rt.rank == 0:
        last = report["epochs"][-1]
        report["results"] = {
            "val_accuracy": last["val_accuracy"], "val_loss": last["val_loss"],
            "test_accuracy": test["accuracy"], "test_loss": test["loss"],
            "test_correct": test["correct"], "test_total": test["total"],
            "eval_flip": ns.train.eval_flip,
            "test_accuracy_one_view": test["one_view_accuracy"],
            "target_accuracy": target,
            "target_reached_epoch": next((e["epoch"] for e in report["epochs"]
                                          if target is not None and e["val_accuracy"] >= target), None),
            "stopped_early": stop_reason,
        }
        finish_timing(report, startup_s, data_load_s, target, test_eval_s)
        segment.update(end="completed", ended=now_iso())
        report.update(status="completed", finished=now_iso())
        timing_mod.finish(tm, report)                         # [timing] final split, TensorBoard, plots
        report_mod.write_report(run_dir, report)
        return report
    return None


AGREED_ERRORS = (data_mod.DataError, RunDirError, checkpoint.CheckpointError)


def agree(rt: runtime.Runtime, action):
    """Run action on this rank; if it fails on any rank, raise on every rank (no rank is left
    waiting in a collective for one that already gave up)."""
    error = result = None
    try:
        result = action()
    except AGREED_ERRORS as e:
        error = e
    failures = rt.hvd_tf.allgather_object(None if error is None else (type(error).__name__, str(error)))
    failures = [f for f in failures if f]
    if error is not None:
        raise error
    if failures:
        kind, message = failures[0]
        raise {cls.__name__: cls for cls in AGREED_ERRORS}[kind](message)
    return result


def prepare_run_dir(run_dir: str, overwrite: bool, resume: bool, cfg: dict) -> bool:
    """Make run_dir ready; returns True when the run continues from its checkpoint.

    A finished run is refused unless overwrite. An unfinished run with a checkpoint is resumed (also
    without --resume: that is how a requeued job continues). An earlier attempt that never wrote a
    checkpoint keeps its report under report.attempt-N.json."""
    report_path = os.path.join(run_dir, "report.json")
    status = _report_status(report_path)
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


def _report_status(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("status", "unknown")
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return "unreadable"


def restore(run_dir: str, model, optimizer, cfg: dict) -> tuple[dict, str]:
    """Load the newest usable checkpoint (rank 0) after checking the config still fits it."""
    state, path = checkpoint.load_latest(run_dir, model, optimizer)
    saved, current = _flat(state["config"]), _flat(cfg)
    changed = [k for k in RESUME_INCOMPATIBLE if saved.get(k) != current.get(k)]
    if changed:
        details = "; ".join(f"{k}: checkpoint has {saved.get(k)!r}, config has {current.get(k)!r}" for k in changed)
        raise RunDirError(f"{run_dir}: cannot resume with a changed {', '.join(changed)} ({details}); "
                          f"start a new --run-dir instead")
    keep = ("epoch", "position", "samples_done", "partial", "train_metrics", "epochs", "segments")
    return {k: state[k] for k in keep}, path


def _flat(cfg: dict) -> dict:
    return {f"{section}.{key}": value for section, values in cfg.items() for key, value in values.items()}


def merge_records(earlier: list[dict] | None, later: list[dict]) -> list[dict]:
    """Per-rank records of one epoch added up across chunks (and across segments after a resume)."""
    merged = {r["rank"]: dict(r) for r in earlier or []}
    for r in later:
        into = merged.setdefault(r["rank"], {})
        for key, value in r.items():
            if key in ("rank", "host"):
                into[key] = value
            else:
                into[key] = into.get(key, 0) + value
    return [merged[k] for k in sorted(merged)]


def agreed_stop(rt: runtime.Runtime, stop: StopFlag, time_limit: float | None) -> str | None:
    """Whether any rank got a stop signal or passed the time limit; the same answer on every rank."""
    import tensorflow as tf

    over_time = time_limit is not None and seconds_since_process_start(time.perf_counter()) >= time_limit
    flags = rt.hvd_tf.allreduce(tf.constant([float(stop.signal is not None), float(over_time)]),
                                op=rt.hvd_tf.Max, name="stop_flags").numpy()
    if flags[0]:
        return f"stop signal ({stop.signal or 'received by another rank'})"
    if flags[1]:
        return f"time limit of {time_limit:g} s reached"
    return None


def make_step_control(tf, rt: runtime.Runtime, stop: StopFlag, check_every: int, time_limit: float | None,
                      checkpoint_every: int):
    """A callback that ends fit at a step boundary when the ranks agree to stop, or when a
    mid-epoch checkpoint is due (every checkpoint_every steps; 0 = only at epoch ends)."""

    class StepControl(tf.keras.callbacks.Callback):
        stop_reason: str | None = None
        checkpoint_due = False
        global_steps = 0

        def on_train_batch_end(self, batch, logs=None):
            self.global_steps += 1
            self.checkpoint_due = bool(checkpoint_every) and self.global_steps % checkpoint_every == 0
            if self.global_steps % check_every == 0:
                self.stop_reason = agreed_stop(rt, stop, time_limit)
            if self.stop_reason or self.checkpoint_due:
                self.model.stop_training = True

    return StepControl()


def make_step_timer(tf):
    """A callback summing the time inside training steps (compute + allreduce) over an epoch."""

    class StepTimer(tf.keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.step_s, self.steps = 0.0, 0

        def on_train_batch_begin(self, batch, logs=None):
            self._start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.step_s += time.perf_counter() - self._start
            self.steps += 1

    return StepTimer()


def make_batches(tf, x: np.ndarray, y: np.ndarray, t, epoch: int, rank: int, first_batch: int = 0):
    """This rank's epoch as batches: uint8 -> float in [0, 1], one-hot labels, optional
    flips/shifts drawn from a seed of (seed, epoch, rank, batch) so a run is reproducible."""
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(t.batch_size, drop_remainder=True).enumerate()

    def prepare(i, batch):
        images, labels = batch
        images = tf.cast(images[..., None], tf.float32) / 255.0
        seed = tf.stack([tf.cast(t.seed * 1_000_003 + epoch * 1009 + rank, tf.int64), i + first_batch])
        if t.augment_flip:
            images = tf.image.stateless_random_flip_left_right(images, seed)
        if t.augment_shift:
            images = random_shift(tf, images, t.augment_shift, seed)
        return images, tf.one_hot(tf.cast(labels, tf.int32), 10)

    # No tf.data autotuning: tearing down its model thread at the end of a fit call stalled the
    # next epoch by about an epoch's compute time in roughly half of the fit calls (measured).
    options = tf.data.Options()
    options.autotune.enabled = False
    options.experimental_optimization.apply_default_optimizations = False
    return ds.map(prepare).prefetch(2).with_options(options)


def random_shift(tf, images, max_shift: int, seed):
    """Shift each image by up to max_shift pixels in x and y, filling with zeros."""
    n = tf.shape(images)[0]
    shifts = tf.random.stateless_uniform([n, 2], seed, -max_shift, max_shift + 1, dtype=tf.int32)
    shifts = tf.cast(shifts, tf.float32)
    ones, zeros = tf.ones([n, 1]), tf.zeros([n, 1])
    transforms = tf.concat([ones, zeros, -shifts[:, :1], zeros, ones, -shifts[:, 1:], zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=tf.shape(images)[1:3],
        fill_value=0.0, interpolation="NEAREST", fill_mode="CONSTANT")


def evaluate(model, x: np.ndarray, y: np.ndarray, rt: runtime.Runtime, batch_size: int, flip: bool = False) -> dict:
    """Exact accuracy over all of x: each rank predicts a disjoint part, counts are summed.
    With flip, the logits of each image and its mirror image are averaged; the accuracy of the
    image alone is returned too (one_view_accuracy)."""
    import tensorflow as tf

    part = np.array_split(np.arange(len(x)), rt.size)[rt.rank]
    correct, one_view_correct, loss_sum = 0, 0, 0.0
    for start in range(0, len(part), batch_size):
        idx = part[start:start + batch_size]
        logits = predict_logits(model, tf.constant(x[idx]))
        labels = y[idx].astype(np.int64)
        one_view_correct += int(np.sum(np.argmax(logits, axis=1) == labels))
        if flip:
            logits = (logits + predict_logits(model, tf.constant(np.ascontiguousarray(x[idx][:, :, ::-1])))) / 2
        correct += int(np.sum(np.argmax(logits, axis=1) == labels))
        loss_sum += float(np.sum(tf.keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)))
    totals = rt.hvd.allreduce(tf.constant([correct, one_view_correct, loss_sum, len(part)], tf.float64),
                              op=rt.hvd.Sum)
    correct, one_view_correct, loss_sum, total = (float(v) for v in totals.numpy())
    return {"accuracy": correct / total, "one_view_accuracy": one_view_correct / total, "loss": loss_sum / total,
            "correct": int(correct), "total": int(total)}


def predict_logits(model, images_uint8) -> np.ndarray:
    import tensorflow as tf

    if not hasattr(model, "_fmnist_predict"):
        @tf.function(reduce_retracing=True)
        def fn(images):
            return tf.cast(model(tf.cast(images[..., None], tf.float32) / 255.0, training=False), tf.float32)
        model._fmnist_predict = fn
    return model._fmnist_predict(images_uint8).numpy()


def barrier(hvd) -> float:
    """Seconds this rank waits for the slowest one (a tiny allreduce every rank must enter)."""
    import tensorflow as tf

    t = time.perf_counter()
    hvd.allreduce(tf.constant(0.0), op=hvd.Sum, name="epoch_barrier")
    return time.perf_counter() - t


def weights_digest(model) -> str:
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()


def index_digest(indices: np.ndarray) -> str:
    """SHA-256 of an index array as int64: lets a reader re-derive and check a rank's shard."""
    return hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()


def describe_world(rt: runtime.Runtime, shard_size: int, weights_sha: str, shard_sha: str) -> dict:
    me = {"rank": rt.rank, "host": rt.host, "local_rank": rt.local_rank, "pid": os.getpid(),
          "threads": rt.threads, "cpu_affinity": sorted(os.sched_getaffinity(0)),
          "shard_size": shard_size, "epoch1_shard_sha256": shard_sha,
          "initial_weights_sha256": weights_sha}
    ranks = sorted(rt.hvd_tf.allgather_object(me), key=lambda r: r["rank"])
    hosts: dict[str, list[int]] = {}
    for r in ranks:
        hosts.setdefault(r["host"], []).append(r["rank"])
    return {"size": rt.size, "hosts": hosts, "ranks": ranks}


def finish_timing(report: dict, startup_s: float, data_load_s: float, target, test_eval_s: float = 0.0) -> None:
    timing = report_mod.timing_summary(report["epochs"], target)
    timing["evaluation_s"] += test_eval_s
    timing.update(startup_s=startup_s, data_load_s=data_load_s,
                  total_s=startup_s + timing["training_s"] + timing["evaluation_s"])
    report["timing"] = timing


def epoch_line(e: dict, epochs: int) -> str:
    return (f"epoch {e['epoch']}/{epochs}  loss {e['train_loss']:.4f}  acc {e['train_accuracy']:.4f}  "
            f"val_loss {e['val_loss']:.4f}  val_acc {e['val_accuracy']:.4f}  lr {e['lr']:.2e}  "
            f"{e['training_s']:.1f} s  {e['images_per_s']:.0f} img/s")


def seconds_since_process_start(now_perf: float) -> float:
    """How long this process ran before `now_perf` (interpreter, imports): from /proc/self/stat."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        ran = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
        return max(0.0, ran - (time.perf_counter() - now_perf))
    except (OSError, ValueError, IndexError):
        return 0.0




def default_run_dir(config_path: str | None) -> str:
    name = os.path.splitext(os.path.basename(config_path))[0] if config_path else "defaults"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{stamp}-{name}-{socket.gethostname()}")
