"""What a benchmark launch measures: training throughput with the training code itself, and the
matmul peak. Imported by the worker after `runtime.prepare` (TensorFlow loads here)."""
from __future__ import annotations

import os
import re
import sys
import time
from typing import Any

import tensorflow as tf

from .. import cpu, mpi
from .. import data as data_mod
from ..config import describe_layers
from ..environment import thread_layout
from ..scaling import plan_batches
from ..training import runtime
from ..training.callbacks import StepTimer
from ..training.model import (build_and_compile, build_model, flops_per_image, flops_per_image_of, gradients_computed,
                              train_flops_by_layer, train_flops_per_image)
from ..training.pipeline import make_batches

_T0 = time.perf_counter()


def _stage(what: str) -> None:
    """A progress line into the launch's log: seconds since TensorFlow was imported."""
    print(f"bench worker pid {os.getpid()}: {time.perf_counter() - _T0:7.1f} s  {what}", file=sys.stderr, flush=True)


def start_single(ns: Any, towers: int = 1) -> tuple[dict, int]:
    """runtime.start minus Horovod: the same ITEX, threads and precision decision (the worker ran
    environment.prepare before TensorFlow loaded) for a process carrying `towers` simulated ranks."""
    node = cpu.node_facts()
    threads = int(os.environ["FMNIST_THREADS"])
    intra, inter = thread_layout(threads, towers, ns.intel.intra_op_threads, ns.intel.inter_op_threads)
    os.environ["OMP_NUM_THREADS"] = str(intra)     # before ITEX loads, as runtime.start says why
    itex = runtime.load_itex(ns.intel.itex, node)
    tf.config.threading.set_intra_op_parallelism_threads(intra)
    tf.config.threading.set_inter_op_parallelism_threads(inter)
    runtime.set_precision(ns.intel.mixed_precision, [node], itex)
    return itex, threads


def throughput(ns: Any, horovod: bool, warmup_steps: int, steps: int,
               tensorflow_loaded_before_prepare: bool = False) -> dict | None:
    """images/s of `steps` timed steps after `warmup_steps` untimed ones, all ranks, as training runs
    them; each rank's record of what was in effect (in_effect) goes with its figures."""
    _stage("start")
    if horovod:
        rt = runtime.start(ns, towers=lambda size, nodes, precision: plan_batches(ns.train, size).ranks_per_process)
        hvd, rank, world, threads, environment = rt.hvd, rt.rank, rt.size, rt.threads, rt.environment
    else:
        itex, threads = start_single(ns, plan_batches(ns.train, 1).ranks_per_process)
        rt = hvd = None
        rank, world = 0, 1
        environment = {"itex": itex, "onednn_enabled": runtime.onednn_enabled(), "horovod_controller": None,
                       "mixed_precision_policy": tf.keras.mixed_precision.global_policy().name,
                       "itex_auto_mixed_precision": os.environ.get("ITEX_AUTO_MIXED_PRECISION") == "1"
                       and itex["loaded"],
                       "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
                       "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads()}
    effect = in_effect(environment["itex"], world, tensorflow_loaded_before_prepare)
    environment["in_effect"] = effect
    _stage(f"TensorFlow{' and Horovod' if horovod else ''} ready, {threads} threads; in effect: {effect}")
    t = ns.train
    dataset = data_mod.load_fashion_mnist(ns.data.dir, ns.data.download, ns.data.cache_dir, ns.data.url,
                                          progress=False)
    train_idx, _ = data_mod.split_train_val(len(dataset.y_train), ns.data.val_size, t.seed)
    split = plan_batches(t, world)
    shard = data_mod.epoch_shard(train_idx, 1, t.seed, rank, world, split.per_process)
    batches = make_batches(dataset.x_train[shard], dataset.y_train[shard], t, split.per_process, 1, rank).repeat()
    steps_per_epoch = data_mod.steps_per_epoch(len(train_idx), world, split.per_process)
    model, optimizer, _ = build_and_compile(ns, split, steps_per_epoch, rt.distributed_optimizer if rt else None)
    callbacks = []
    if hvd is not None:
        rt.hvd_tf.broadcast_variables(model.variables + optimizer.variables(), root_rank=0)
        callbacks.append(hvd.callbacks.MetricAverageCallback())
    timer = StepTimer()
    _stage("data and model ready")
    # The dataset itself, as training passes it: given a Python iterator, Keras wraps it as a
    # generator, and steps then waited for it in multiples of ~85 ms (measured: 5.1, 10.3, 20.5 s
    # for 60 steps whatever the variant).
    model.fit(batches, epochs=1, steps_per_epoch=warmup_steps, callbacks=callbacks + [timer], verbose=0)
    warm_step_s = timer.step_s
    _stage(f"{warmup_steps} warm-up steps done")
    if hvd is not None:
        hvd.allreduce(tf.constant(0.0), name="bench_barrier")
    t0 = time.perf_counter()
    model.fit(batches, epochs=1, steps_per_epoch=steps, callbacks=callbacks + [timer], verbose=0)
    fit_s = time.perf_counter() - t0
    _stage(f"{steps} timed steps done in {fit_s:.2f} s")
    mine = {"rank": rank, "fit_s": fit_s, "step_s": timer.step_s, "steps": timer.steps, "warmup_step_s": warm_step_s,
            "threads": threads, "affinity": sorted(os.sched_getaffinity(0)), "pid": os.getpid(), "in_effect": effect}
    ranks = rt.hvd_tf.allgather_object(mine) if hvd is not None else [mine]
    if rank != 0:
        return None
    slowest = max(r["fit_s"] for r in ranks)
    images = sum(r["steps"] for r in ranks) * split.per_process
    fpi = flops_per_image(model)
    keep = ("itex", "onednn_enabled", "horovod_controller", "mixed_precision_policy", "itex_auto_mixed_precision",
            "intra_op_threads", "inter_op_threads", "in_effect")
    return {"images_per_s": images / slowest, "fit_s": slowest, "images": images, "world": world,
            "batch_size": split.per_process, "ranks": sorted(ranks, key=lambda r: r["rank"]),
            "environment": {k: environment.get(k) for k in keep},
            "model": {"description": describe_layers(ns.model.layers), "parameters": int(model.count_params()),
                      "flops_per_image": fpi, "train_flops_per_image": train_flops_per_image(model)}}


def in_effect(itex: dict, world: int, tensorflow_loaded_before_prepare: bool = False) -> dict:
    """What this process really runs with, asked of TensorFlow itself rather than of the variables
    that requested it (TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, as it loads): the ops TensorFlow
    executes for a small convolution and matmul (runtime.executed_ops). oneDNN on: they
    become _Mkl ops. ITEX in effect: _ITEX ops. ITEX auto mixed precision: some run in bfloat16.
    Threads and the Keras policy as TensorFlow's config reports them. Call once ITEX is loaded and
    the thread pools are sized."""
    rewritten = runtime.executed_ops(grappler=True)
    # ITEX's graph optimizer (a grappler plugin) turns Conv2D and MatMul into its own ops before
    # TensorFlow's oneDNN rewrite (a pass after partitioning) sees them: that needs grappler off.
    plain = runtime.executed_ops(grappler=False)
    return {"onednn": any(op.startswith("_Mkl") for op, _ in plain),
            "itex": any(op.startswith("_ITEX") for op, _ in rewritten),
            "itex_loaded": bool(itex["loaded"]),
            "itex_auto_mixed_precision": any(dtype == "bfloat16" for _, dtype in rewritten),
            "mixed_precision_policy": tf.keras.mixed_precision.global_policy().name,
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "world": world,
            "mpi": mpi_loaded(),
            "ccl": _mapped(r"/libccl\.so"),
            "tensorflow_loaded_before_prepare": tensorflow_loaded_before_prepare}


def mpi_loaded() -> str | None:
    """The family of the MPI library this process has loaded (Horovod's), from its memory map; None
    without one (no Horovod, or Horovod without MPI)."""
    families = {mpi.library(path).family for path in sorted(_mapped_paths(r"/libmpi(ch)?\.so"))}
    return families.pop() if len(families) == 1 else None


def _mapped_paths(pattern: str) -> set[str]:
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            return {line.split()[-1] for line in f if re.search(pattern, line)}
    except OSError:
        return set()


def _mapped(pattern: str) -> bool:
    """Whether this process has a library matching pattern loaded (oneCCL: Horovod built with it)."""
    return bool(_mapped_paths(pattern))


def peak(ns: Any, n: int, calls: int, rounds: int = 3) -> dict:
    """GFLOP/s of n x n matmuls with all of this process's threads (see matmul_peak)."""
    itex, threads = start_single(ns)
    return {"peak": {**matmul_peak(n, calls, rounds), "threads": threads, "itex": itex["loaded"]}}


def matmul_peak(n: int, calls: int, rounds: int = 3) -> dict:
    """GFLOP/s of n x n matmuls in float32 (and bfloat16 where the CPU has it natively); rounds
    alternate the types, each the best of `calls` timed calls."""
    out = {"fp32": [], "bf16": []}
    dtypes = [("fp32", tf.float32)] + ([("bf16", tf.bfloat16)] if cpu.node_facts()["native_bf16"] else [])
    mats = {}
    for key, dtype in dtypes:
        a = tf.cast(tf.random.stateless_uniform((n, n), seed=[1, 2], minval=-1, maxval=1), dtype)
        b = tf.cast(tf.random.stateless_uniform((n, n), seed=[3, 4], minval=-1, maxval=1), dtype)
        mats[key] = (a, b)

    @tf.function
    def mm(a, b):
        return tf.matmul(a, b)[0, 0]

    for key in mats:
        mm(*mats[key]).numpy()  # trace and warm up
    for _ in range(rounds):
        for key, (a, b) in mats.items():
            times = []
            for _ in range(calls):
                t0 = time.perf_counter()
                mm(a, b).numpy()
                times.append(time.perf_counter() - t0)
            out[key].append(2 * n ** 3 / min(times) / 1e9)
    return out


def layer_profile(ns: Any, batch: int, calls: int, rounds: int = 3) -> dict:
    """Where a training step's time goes, layer by layer, with this process's threads and precision.

    Each layer alone, on a batch of its input's shape: forward and backward (the gradients a
    training step computes: model.gradients_computed), best of `calls` calls, the median over
    `rounds`. The whole model's step (forward, loss, every gradient; no optimizer update) is timed
    the same way, so the parts can be checked against the whole. The matmul peak is measured here
    too, with the same threads, so a layer's GFLOP/s is compared with what these threads can do.
    """
    _, threads = start_single(ns)
    model = build_model(ns.model.layers, ns.train.seed, first_conv_frozen=ns.model.first_conv_frozen)
    loss_fn = tf.keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=ns.train.label_smoothing)
    images = tf.random.stateless_uniform((batch, *model.input_shape[1:]), seed=[1, 2])
    labels = tf.one_hot(tf.random.stateless_uniform((batch,), seed=[3, 4], maxval=10, dtype=tf.int32), 10)

    @tf.function
    def whole_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        return tape.gradient(loss, model.trainable_variables)

    rows = []
    layer_gradients = zip(model.layers, gradients_computed(model), train_flops_by_layer(model))
    for index, (layer, (input_gradient, _), train_flops) in enumerate(layer_gradients):
        x = tf.cast(tf.random.stateless_uniform((batch, *layer.input.shape[1:]), seed=[index, 5]),
                    layer.compute_dtype if index else tf.float32)
        dy = tf.cast(tf.random.stateless_normal((batch, *layer.output.shape[1:]), seed=[index, 6]),
                     layer.compute_dtype)
        rows.append({"index": index, "name": layer.name, "kind": type(layer).__name__,
                     "input": list(layer.input.shape[1:]), "output": list(layer.output.shape[1:]),
                     "flops_per_image": flops_per_image_of(layer),
                     "train_flops_per_image": train_flops,
                     "step": _layer_step(layer, input_gradient),
                     "args": (x, dy)})
    timings = {"whole": [], **{row["name"]: [] for row in rows}}
    for _ in range(rounds):
        timings["whole"].append(_best_time(whole_step, (images, labels), calls))
        for row in rows:
            timings[row["name"]].append(_best_time(row["step"], row["args"], calls))
    peak_gflops = matmul_peak(1024, calls, rounds=1)
    key = "bf16" if tf.keras.mixed_precision.global_policy().compute_dtype == "bfloat16" else "fp32"
    layers = []
    for row in rows:
        seconds = sorted(timings[row["name"]])[len(timings[row["name"]]) // 2]
        gflops = row["train_flops_per_image"] * batch / seconds / 1e9 if row["flops_per_image"] else None
        layers.append({k: row[k] for k in ("index", "name", "kind", "input", "output", "flops_per_image",
                                           "train_flops_per_image")}
                      | {"step_s": seconds, "gflops": gflops})
    whole = sorted(timings["whole"])[rounds // 2]
    return {"layers": {"batch": batch, "threads": threads, "cores": sorted(os.sched_getaffinity(0)), "precision": key,
                       "policy": tf.keras.mixed_precision.global_policy().name,
                       "peak_gflops": max(peak_gflops[key]) if peak_gflops[key] else max(peak_gflops["fp32"]),
                       "whole_step_s": whole, "sum_of_layers_s": sum(x["step_s"] for x in layers),
                       "flops_per_image": flops_per_image(model),
                       "train_flops_per_image": train_flops_per_image(model), "rows": layers}}


def _layer_step(layer: tf.keras.layers.Layer, input_gradient: bool):
    @tf.function
    def step(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        sources = ([x] if input_gradient else []) + layer.trainable_variables
        # y too: the gradients of a conv or dense layer do not need its output, and a step that did
        # not return it would time the backward pass alone.
        return [y, *tape.gradient(y, sources, output_gradients=dy)] if sources else [y]
    return step


def _best_time(fn, args: tuple, calls: int) -> float:
    fn(*args)                                   # trace and warm up (oneDNN primitives)
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        fn(*args)                               # eager calls on the CPU return when done
        best = min(best, time.perf_counter() - t0)
    return best
