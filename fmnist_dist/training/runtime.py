"""Horovod initialisation, threads per rank, the agreed precision, and what was really in effect.

Imported after `environment.prepare` (TensorFlow loads here, and reads its variables as it loads).
ITEX, when used, is loaded into TensorFlow before Horovod's library: loading it after aborts. The
only module that imports Horovod.
"""
from __future__ import annotations

import os
import platform
import socket
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import tensorflow as tf

from .. import cpu
from ..errors import SetupError
from ..environment import (itex_dir, launcher_local_size, launcher_nodes, launcher_size, prepare, slurm_cpus_per_task,
                           thread_layout, threads_for_rank)


@dataclass
class Runtime:
    """What a training process needs from its start: Horovod handles and the facts in effect."""
    hvd: Any
    rank: int
    size: int
    local_rank: int
    local_size: int
    host: str
    threads: int
    hvd_tf: Any = None   # horovod.tensorflow, for object gathers and variable broadcasts
    towers: int = 1      # the simulated ranks per process the thread pools were sized for
    environment: dict = field(default_factory=dict)

    @property
    def trains_in(self) -> str:
        """"bf16" or "fp32": the agreed precision, as the accuracy bases and throughput curves name it."""
        return "fp32" if self.environment["precision"]["chosen"] == "fp32" else "bf16"

    def distributed_optimizer(self, optimizer: Any) -> Any:
        """hvd.DistributedOptimizer averaging all of a step's gradients in one grouped allreduce: one
        negotiation and one collective a step rather than one per tensor. 2 Gloo ranks trained 1-8%
        faster in bf16 and 2-5% in fp32, in 4 of 4 alternating rounds (docs/benchmark.md).
        A job of one process keeps its optimizer: the average over one rank changes nothing, and the
        wrapper's ops added 1.5 s to the first step's tracing (docs/benchmark.md)."""
        return self.hvd.DistributedOptimizer(optimizer, groups=1) if self.size > 1 else optimizer


def start(cfg: Any, towers: Callable[[int, int, str], int] | None = None) -> Runtime:
    """Load ITEX, init Horovod, size the thread pools, agree on the precision. Canonical order.
    `towers(size, nodes, precision)`: the simulated ranks each process will carry, asked before ITEX
    loads (its OpenMP reads its thread count then; TensorFlow fixes its pools at the first op, before
    the ranks' CPUs are gathered), so with the launcher's job size and this node's precision."""
    prepare(cfg)                                   # a no-op when the command line already ran it
    node = cpu.node_facts()
    threads = int(os.environ["FMNIST_THREADS"])
    guess = likely_precision(cfg.intel.mixed_precision, node)
    carried = towers(launcher_size(), launcher_nodes(), guess) if towers else 1
    intra, inter = thread_layout(threads, carried, cfg.intel.intra_op_threads, cfg.intel.inter_op_threads)
    # ITEX's kernels run on OpenMP threads, whose number OpenMP reads as ITEX loads: one per tower when
    # towers run side by side (two towers of 2 OpenMP threads each ran 2.5x slower than of one, measured).
    os.environ["OMP_NUM_THREADS"] = str(intra)
    itex = load_itex(cfg.intel.itex, node)         # before Horovod's library: loading it after aborts
    import horovod.tensorflow as hvd_tf
    import horovod.tensorflow.keras as hvd

    hvd.init()
    if cfg.intel.intra_op_threads == 0 and hvd.local_size() != launcher_local_size():
        # The launcher did not say how many ranks share the node: this rank's share, one op at a time.
        threads = threads_for_rank(0, len(os.sched_getaffinity(0)), os.cpu_count() or 1, hvd.local_size(),
                                   slurm_cpus_per_task())
        intra, inter, carried = threads, 1, 1
    tf.config.threading.set_intra_op_parallelism_threads(intra)
    tf.config.threading.set_inter_op_parallelism_threads(inter)
    # Every rank's CPU, gathered: the least capable node decides, so ranks never mix numerics, and
    # an impossible bf16 request fails on every rank here, before the first op could abort.
    nodes = hvd_tf.allgather_object(node)
    precision = set_precision(cfg.intel.mixed_precision, nodes, itex)
    rt = Runtime(hvd=hvd, rank=hvd.rank(), size=hvd.size(), local_rank=hvd.local_rank(),
                 local_size=hvd.local_size(), host=socket.gethostname(), threads=threads,
                 hvd_tf=hvd_tf, towers=carried)
    rt.environment = detect_environment(hvd, threads, itex, precision, nodes)
    return rt


def likely_precision(requested: str, node: dict) -> str:
    """"bf16" or "fp32": what this node alone would train in (cpu.resolve_precision decides for all)."""
    return "bf16" if requested != "fp32" and node["native_bf16"] else "fp32"


def load_itex(requested: str, node: dict) -> dict:
    """Load ITEX's CPU plugin into TensorFlow (before any op runs) when requested and present;
    intel.itex=auto loads it only on a node with native bf16 (cpu.itex_pays says why)."""
    forced = itex_in_site_packages()
    if forced:
        if requested == "off":
            raise SetupError(f"intel.itex=off, but ITEX is installed where TensorFlow always loads it "
                               f"({forced}); reinstall it with scripts/setup.sh (into {itex_dir()})")
        return _itex_imported(requested)
    if requested == "off":
        return {"loaded": False, "version": None, "reason": "disabled by intel.itex=off"}
    if requested == "auto" and not cpu.itex_pays(node):
        return {"loaded": False, "version": None, "reason": f"intel.itex=auto: not used on {node['isa']} ({cpu.ITEX_AUTO_WHY})"}
    plugins = os.path.join(itex_dir(), "tensorflow-plugins")
    if not os.path.isdir(plugins):
        if requested == "on":
            raise SetupError(f"intel.itex=on, but ITEX is not installed in {itex_dir()} "
                               f"(run scripts/setup.sh, or set FMNIST_ITEX_DIR)")
        return {"loaded": False, "version": None, "reason": f"not installed in {itex_dir()}"}
    from tensorflow.python.framework import load_library

    sys.path.insert(0, itex_dir())
    load_library.load_library(plugins)
    load_library.load_pluggable_device_library(plugins)
    return _itex_imported(requested)


def itex_in_site_packages() -> str | None:
    """A tensorflow-plugins/libitex_cpu.so that TensorFlow would load at import, whatever we say."""
    import site

    for directory in site.getsitepackages() + [site.getusersitepackages()]:
        path = os.path.join(directory, "tensorflow-plugins", "libitex_cpu.so")
        if os.path.exists(path):
            return path
    return None


def _itex_imported(requested: str) -> dict:
    try:
        import intel_extension_for_tensorflow as itex
    except Exception as e:  # ImportError, or the plugin failing to register with this TF
        if requested == "on":
            raise SetupError(f"intel.itex=on but Intel Extension for TensorFlow did not load: {e}") from e
        return {"loaded": False, "version": None, "reason": f"not loaded: {e}"}
    return {"loaded": True, "version": getattr(itex, "__version__", "unknown"), "reason": ""}


def set_precision(requested: str, nodes: list[dict], itex: dict) -> dict:
    """Resolve intel.mixed_precision against every rank's node and apply it (Keras policy; ITEX's
    auto mixed precision was switched on at load time by configure_environment)."""
    precision = cpu.resolve_precision(requested, nodes)
    if precision["chosen"] == "itex_bf16" and not itex["loaded"]:
        raise SetupError(f"intel.mixed_precision=itex_bf16 needs ITEX, which is not loaded ({itex['reason']})")
    if precision["chosen"] == "keras_bf16":
        tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    return precision


def detect_environment(hvd: Any, threads: int, itex: dict, precision: dict, nodes: list[dict]) -> dict:
    """Facts detected at run time (not what was asked for)."""
    import horovod  # the package itself, for its version

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "horovod": horovod.__version__,
        "horovod_controller": "mpi" if hvd.mpi_enabled() and hvd.mpi_built() else "gloo",
        "itex": itex,
        "onednn_enabled": onednn_enabled(),
        "mixed_precision_policy": tf.keras.mixed_precision.global_policy().name,
        "itex_auto_mixed_precision": os.environ.get("ITEX_AUTO_MIXED_PRECISION") == "1" and itex["loaded"],
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "kmp_affinity": os.environ.get("KMP_AFFINITY"),
        "kmp_blocktime": os.environ.get("KMP_BLOCKTIME"),
        "bound_by": os.environ.get("FMNIST_BOUND_BY") or (
            "launcher or scheduler" if len(os.sched_getaffinity(0)) < (os.cpu_count() or 1) else "none"),
        "cpu_model": cpu.cpu_model(),
        "cpu_flags": cpu.cpu_flags(),
        "precision": precision,
        "nodes": nodes,
        "node_cores": os.cpu_count(),
        "affinity_cores": sorted(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "argv": sys.argv,
    }


def onednn_enabled() -> bool:
    """Whether TensorFlow runs oneDNN kernels, seen in the ops it executes (with grappler off, so that
    ITEX's rewrite does not hide them). Not IsMklEnabled: TensorFlow reads TF_ENABLE_ONEDNN_OPTS once,
    as it loads, and that binding reads the variable again at its first call, so it reports a change
    made after the import that never took effect."""
    return any(op.startswith("_Mkl") for op, _ in executed_ops(grappler=False))


def executed_ops(grappler: bool) -> set[tuple[str, str]]:
    """(op, its T dtype or "") of each node TensorFlow executes for relu(conv2d) then matmul, after
    its rewrites; grappler=False leaves grappler, and the plugins' optimizers with it, out."""
    graph = tf.Graph()
    with graph.as_default():
        images = tf.compat.v1.placeholder(tf.float32, (2, 8, 8, 3))   # fed: a constant would be folded away
        features = tf.nn.relu(tf.nn.conv2d(images, tf.ones((3, 3, 3, 4)), 1, "SAME"))
        logits = tf.matmul(tf.reshape(features, (2, -1)), tf.ones((8 * 8 * 4, 3)))
    config = tf.compat.v1.ConfigProto(
        intra_op_parallelism_threads=tf.config.threading.get_intra_op_parallelism_threads(),
        inter_op_parallelism_threads=tf.config.threading.get_inter_op_parallelism_threads())
    config.graph_options.rewrite_options.disable_meta_optimizer = not grappler
    metadata = tf.compat.v1.RunMetadata()
    with tf.compat.v1.Session(graph=graph, config=config) as session:
        session.run(logits, {images: [[[[1.0] * 3] * 8] * 8] * 2},
                    options=tf.compat.v1.RunOptions(output_partition_graphs=True), run_metadata=metadata)
    return {(node.op, tf.dtypes.as_dtype(node.attr["T"].type).name if "T" in node.attr else "")
            for partition in metadata.partition_graphs for node in partition.node}

