"""The training job, one process per rank. Read it top to bottom: `train` is the whole story.

Horovod idioms in their canonical order: init, threads, scaled learning rate, DistributedOptimizer,
broadcast of the initial state, metric averaging, output from rank 0 only.
"""
from __future__ import annotations

import hashlib
import os
import socket
import time
from datetime import datetime, timezone

import numpy as np

from . import config as config_mod
from . import data as data_mod
from . import report as report_mod
from . import runtime


class RunDirError(Exception):
    """The run directory cannot be used (holds a finished run, not writable, ...)."""


def train(cfg: dict, run_dir: str, overwrite: bool = False) -> dict | None:
    """Train with the resolved config; rank 0 writes into run_dir and returns the final report
    (other ranks return None)."""
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    ns = config_mod.namespace(cfg)
    rt = runtime.start(ns)                                    # hvd.init + threads + precision
    import tensorflow as tf
    hvd = rt.hvd

    t0 = time.perf_counter()
    dataset = agree(rt, lambda: data_mod.load_fashion_mnist(
        ns.data.dir, ns.data.download, ns.data.cache_dir, ns.data.url, progress=rt.rank == 0))
    agree(rt, lambda: prepare_run_dir(run_dir, overwrite, cfg) if rt.rank == 0 else None)
    data_load_s = time.perf_counter() - t0

    train_idx, val_idx = data_mod.split_train_val(len(dataset.y_train), ns.data.val_size, ns.train.seed)
    steps = data_mod.steps_per_epoch(len(train_idx), rt.size, ns.train.batch_size)
    if ns.train.steps_per_epoch:
        steps = min(steps, ns.train.steps_per_epoch)

    tf.keras.utils.set_random_seed(ns.train.seed)              # same on every rank: same init
    from .model import build_model, describe_layers, flops_per_image
    from .optim import lr_schedule as make_schedule, make_optimizer
    model = build_model(ns.model.layers, ns.train.seed)
    lr_schedule = make_schedule(ns.train, rt.size, steps)
    optimizer = hvd.DistributedOptimizer(make_optimizer(ns.train, lr_schedule))
    model.compile(optimizer=optimizer,
                  loss=tf.keras.losses.CategoricalCrossentropy(from_logits=True,
                                                               label_smoothing=ns.train.label_smoothing),
                  metrics=["accuracy"])
    # Broadcast explicitly before the first step (BroadcastGlobalVariablesCallback would do it
    # after the first batch): every rank starts from rank 0's weights, checked by hash below.
    optimizer.build(model.trainable_variables)
    rt.hvd_tf.broadcast_variables(model.variables + optimizer.variables(), root_rank=0)
    weights_sha = weights_digest(model)

    world = describe_world(rt, steps * ns.train.batch_size, weights_sha)
    report = {
        "schema": report_mod.SCHEMA, "schema_version": report_mod.SCHEMA_VERSION,
        "run_id": os.path.basename(os.path.abspath(run_dir)), "status": "running", "error": None,
        "started": started, "finished": None, "config": cfg, "environment": rt.environment,
        "world": world,
        "data": {"source": dataset.source, "train_size": len(train_idx), "val_size": len(val_idx),
                 "test_size": len(dataset.y_test), "steps_per_epoch": steps,
                 "batch_size_per_rank": ns.train.batch_size,
                 "global_batch_size": ns.train.batch_size * rt.size},
        "model": {"layers": ns.model.layers, "description": describe_layers(ns.model.layers),
                  "parameters": int(model.count_params()),
                  "batch_norm": any(layer["type"] == "batchnorm" for layer in ns.model.layers),
                  "flops_per_image": flops_per_image(model)},
        "epochs": [], "timing": {}, "results": {},
    }
    # Start-up: process start to the first step (interpreter, imports, Horovod, model), data loading excluded.
    startup_s = seconds_since_process_start(t0) + time.perf_counter() - t0 - data_load_s

    timer = make_step_timer(tf)
    callbacks = [hvd.callbacks.MetricAverageCallback(), timer]
    stop_reason = None
    for epoch in range(1, ns.train.epochs + 1):
        t_epoch = time.perf_counter()
        shard = data_mod.epoch_shard(train_idx, epoch, ns.train.seed, rt.rank, rt.size, ns.train.batch_size)
        shard = shard[: steps * ns.train.batch_size]
        batches = make_batches(tf, dataset.x_train[shard], dataset.y_train[shard], ns.train, epoch, rt.rank)
        data_s = time.perf_counter() - t_epoch

        lr = float(lr_schedule(optimizer.iterations))
        t_fit = time.perf_counter()
        history = model.fit(batches, initial_epoch=epoch - 1, epochs=epoch, steps_per_epoch=steps,
                            callbacks=callbacks, verbose=0)
        fit_s = time.perf_counter() - t_fit
        wait_s = barrier(hvd)

        t_eval = time.perf_counter()
        val = evaluate(model, dataset.x_train[val_idx], dataset.y_train[val_idx], rt, ns.train.eval_batch_size)
        eval_s = time.perf_counter() - t_eval

        record = {"rank": rt.rank, "host": rt.host, "data_s": data_s, "step_s": timer.step_s,
                  "fit_s": fit_s, "wait_s": wait_s, "eval_s": eval_s, "steps": timer.steps,
                  "samples": timer.steps * ns.train.batch_size}
        records = rt.hvd_tf.allgather_object(record)
        metrics = {"lr": lr,
                   "train_loss": float(history.history["loss"][-1]),
                   "train_accuracy": float(history.history["accuracy"][-1]),
                   "val_loss": val["loss"], "val_accuracy": val["accuracy"]}
        if rt.rank == 0:
            report["epochs"].append(report_mod.epoch_summary(epoch, records, metrics))
            finish_timing(report, startup_s, data_load_s, ns.train.target_accuracy)
            report_mod.write_report(run_dir, report)
            print(epoch_line(report["epochs"][-1], ns.train.epochs), flush=True)
        target = ns.train.target_accuracy
        if target is not None and val["accuracy"] >= target:   # identical on every rank (allreduced)
            stop_reason = f"validation accuracy {val['accuracy']:.4f} reached target {target}"
            break

    t_test = time.perf_counter()
    test = evaluate(model, dataset.x_test, dataset.y_test, rt, ns.train.eval_batch_size)
    test_eval_s = time.perf_counter() - t_test
    if rt.rank == 0:
        last = report["epochs"][-1]
        report["results"] = {
            "val_accuracy": last["val_accuracy"], "val_loss": last["val_loss"],
            "test_accuracy": test["accuracy"], "test_loss": test["loss"],
            "test_correct": test["correct"], "test_total": test["total"],
            "target_accuracy": ns.train.target_accuracy,
            "target_reached_epoch": next((e["epoch"] for e in report["epochs"]
                                          if target is not None and e["val_accuracy"] >= target), None),
            "stopped_early": stop_reason,
        }
        finish_timing(report, startup_s, data_load_s, ns.train.target_accuracy, test_eval_s)
        report["status"] = "completed"
        report["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        report_mod.write_report(run_dir, report)
        return report
    return None


def agree(rt: runtime.Runtime, action):
    """Run action on this rank; if it fails on any rank, raise on every rank (no rank is left
    waiting in a collective for one that already gave up)."""
    error = None
    result = None
    try:
        result = action()
    except (data_mod.DataError, RunDirError) as e:
        error = e
    failures = [f for f in rt.hvd_tf.allgather_object(None if error is None else (type(error).__name__, str(error))) if f]
    if error is not None:
        raise error
    if failures:
        kind, message = failures[0]
        raise (data_mod.DataError if kind == "DataError" else RunDirError)(message)
    return result


def prepare_run_dir(run_dir: str, overwrite: bool, cfg: dict) -> None:
    """Create the run directory and save the resolved config; refuse a directory that already
    holds a run unless overwrite."""
    existing = os.path.join(run_dir, "report.json")
    if os.path.exists(existing) and not overwrite:
        raise RunDirError(f"{run_dir}: already holds a run ({existing}); choose another --run-dir, "
                          f"or pass --overwrite to replace it")
    try:
        os.makedirs(run_dir, exist_ok=True)
        for name in report_mod.REPORT_FILES:
            if overwrite and os.path.exists(os.path.join(run_dir, name)):
                os.unlink(os.path.join(run_dir, name))
        report_mod.atomic_write(os.path.join(run_dir, "config.yaml"), config_mod.dump(cfg))
    except OSError as e:
        raise RunDirError(f"{run_dir}: cannot write the run directory: {e.strerror or e}") from None


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


def make_batches(tf, x: np.ndarray, y: np.ndarray, t, epoch: int, rank: int):
    """This rank's epoch as batches: uint8 -> float in [0, 1], one-hot labels, optional
    flips/shifts drawn from a seed of (seed, epoch, rank, batch) so a run is reproducible."""
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(t.batch_size, drop_remainder=True).enumerate()

    def prepare(i, batch):
        images, labels = batch
        images = tf.cast(images[..., None], tf.float32) / 255.0
        seed = tf.stack([tf.cast(t.seed * 1_000_003 + epoch * 1009 + rank, tf.int64), i])
        if t.augment_flip:
            images = tf.image.stateless_random_flip_left_right(images, seed)
        if t.augment_shift:
            images = random_shift(tf, images, t.augment_shift, seed)
        return images, tf.one_hot(tf.cast(labels, tf.int32), 10)

    return ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


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


def evaluate(model, x: np.ndarray, y: np.ndarray, rt: runtime.Runtime, batch_size: int) -> dict:
    """Exact accuracy over all of x: each rank predicts a disjoint part, counts are summed."""
    import tensorflow as tf

    part = np.array_split(np.arange(len(x)), rt.size)[rt.rank]
    correct, loss_sum = 0, 0.0
    for start in range(0, len(part), batch_size):
        idx = part[start:start + batch_size]
        logits = predict_logits(model, tf.constant(x[idx]))
        labels = y[idx].astype(np.int64)
        correct += int(np.sum(np.argmax(logits, axis=1) == labels))
        loss_sum += float(np.sum(tf.keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)))
    totals = rt.hvd.allreduce(tf.constant([correct, loss_sum, len(part)], tf.float64), op=rt.hvd.Sum)
    correct, loss_sum, total = (float(v) for v in totals.numpy())
    return {"accuracy": correct / total, "loss": loss_sum / total, "correct": int(correct), "total": int(total)}


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


def describe_world(rt: runtime.Runtime, shard_size: int, weights_sha: str) -> dict:
    me = {"rank": rt.rank, "host": rt.host, "local_rank": rt.local_rank, "pid": os.getpid(),
          "threads": rt.threads, "cpu_affinity": sorted(os.sched_getaffinity(0)),
          "shard_size": shard_size, "initial_weights_sha256": weights_sha}
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
