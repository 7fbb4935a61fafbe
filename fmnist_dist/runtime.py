"""Process set-up before TensorFlow starts, Horovod initialisation, and what was really in effect.

The order matters: thread and oneDNN/ITEX environment variables are read when TensorFlow (and its
plugins) load, and the intra-op pool is built on the first op. So `configure_environment` runs
before `import tensorflow`, and `start` sets the pool sizes right after `hvd.init()`.
"""
from __future__ import annotations

import os
import platform
import re
import socket
import sys
from dataclasses import dataclass, field
from typing import Any

from . import cpu
from .errors import SetupError

# Variables launchers set for "how many ranks share this node", in order of trust.
LOCAL_SIZE_VARS = ("OMPI_COMM_WORLD_LOCAL_SIZE", "HOROVOD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE")
RANK_VARS = ("OMPI_COMM_WORLD_RANK", "HOROVOD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID")
BOUND_BY_US = False   # set when configure_environment narrowed this process's affinity
LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "HOROVOD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK")


def launcher_local_size(environ: dict[str, str] = os.environ) -> int:
    """Ranks on this node as the launcher announced it (1 when started without one)."""
    for name in LOCAL_SIZE_VARS:
        if environ.get(name, "").isdigit():
            return max(1, int(environ[name]))
    slurm = environ.get("SLURM_TASKS_PER_NODE", "")  # e.g. "2(x3)" or "2,1"
    if environ.get("SLURM_STEP_ID") is not None and re.match(r"^\d+", slurm):
        return max(1, int(re.match(r"^\d+", slurm).group()))
    return 1


def launcher_rank(environ: dict[str, str] = os.environ) -> int:
    for name in RANK_VARS:
        if environ.get(name, "").isdigit():
            return int(environ[name])
    return 0


def launcher_local_rank(environ: dict[str, str] = os.environ) -> int | None:
    """This rank's index among the ranks of its node, as the launcher announced it (None if unknown)."""
    for name in LOCAL_RANK_VARS:
        if environ.get(name, "").isdigit():
            return int(environ[name])
    if environ.get("SLURM_STEP_ID") is not None and environ.get("SLURM_LOCALID", "").isdigit():
        return int(environ["SLURM_LOCALID"])
    return None


def cores_to_bind(affinity: set[int], node_cores: int, local_size: int, local_rank: int | None) -> list[int] | None:
    """The slice of the node's cores an unbound rank should keep to (None: leave the affinity alone).

    Only when the rank may run on every core of the node (no launcher binding, no cgroup) and shares
    the node with other ranks: unbound, the OpenMP runtime that ITEX loads pins each rank's first
    OpenMP thread by KMP_AFFINITY, and every rank picks the same first core (measured: 2 ranks on
    2 cores both pinned a worker to core 0)."""
    if local_rank is None or local_size < 2 or len(affinity) < node_cores or local_size > len(affinity):
        return None
    cores, share = sorted(affinity), len(affinity) // local_size
    return cores[local_rank * share:(local_rank + 1) * share]


def slurm_cpus_per_task(environ: dict[str, str] = os.environ) -> int | None:
    """--cpus-per-task of the Slurm job step this process is a task of (None outside a step)."""
    value = environ.get("SLURM_CPUS_PER_TASK", "")
    return int(value) if environ.get("SLURM_STEP_ID") is not None and value.isdigit() else None


def threads_for_rank(requested: int, affinity_cores: int, node_cores: int, local_size: int,
                     cpus_per_task: int | None = None) -> int:
    """Intra-op threads: as configured, else the cores this rank may use.

    A rank bound by its launcher sees only its own cores in its affinity mask; an unbound rank sees
    the whole node and shares it with the other ranks on the node. Under a Slurm job step the
    task's --cpus-per-task is the share (cgroups may confine the job without binding each task).
    """
    if requested > 0:
        return requested
    if cpus_per_task:
        return max(1, min(cpus_per_task, affinity_cores))
    if affinity_cores < node_cores:
        return max(1, affinity_cores)
    return max(1, node_cores // max(1, local_size))


def configure_environment(intel: Any, environ: dict[str, str] = os.environ) -> dict[str, str]:
    """Set the variables TensorFlow, oneDNN, OpenMP and ITEX read at load time. Returns them."""
    local_size = launcher_local_size(environ)
    if intel.bind == "auto":
        cores = cores_to_bind(os.sched_getaffinity(0), os.cpu_count() or 1, local_size, launcher_local_rank(environ))
        if cores:
            os.sched_setaffinity(0, cores)
            global BOUND_BY_US
            BOUND_BY_US = True
    threads = threads_for_rank(intel.intra_op_threads, len(os.sched_getaffinity(0)),
                               os.cpu_count() or 1, local_size, slurm_cpus_per_task(environ))
    settings = {
        "TF_ENABLE_ONEDNN_OPTS": "1" if intel.onednn else "0",
        "OMP_NUM_THREADS": str(threads),
        "KMP_AFFINITY": intel.kmp_affinity,
        "KMP_BLOCKTIME": str(intel.kmp_blocktime),
        "TF_CPP_MIN_LOG_LEVEL": environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
        "FMNIST_THREADS": str(threads),
    }
    if intel.mixed_precision == "itex_bf16":
        settings.update({"ITEX_AUTO_MIXED_PRECISION": "1", "ITEX_AUTO_MIXED_PRECISION_DATA_TYPE": "BFLOAT16"})
    environ.update(settings)
    return settings


def itex_dir() -> str:
    """Where set-up installs ITEX: outside site-packages, so that loading it is our choice."""
    return os.environ.get("FMNIST_ITEX_DIR") or os.path.join(sys.prefix, "itex")


def itex_in_site_packages() -> str | None:
    """A tensorflow-plugins/libitex_cpu.so that TensorFlow would load at import, whatever we say."""
    import site

    for directory in site.getsitepackages() + [site.getusersitepackages()]:
        path = os.path.join(directory, "tensorflow-plugins", "libitex_cpu.so")
        if os.path.exists(path):
            return path
    return None


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
    environment: dict = field(default_factory=dict)


def start(cfg: Any) -> Runtime:
    """Import TF and Horovod, init Horovod, size the thread pools, agree on the precision."""
    node = cpu.node_facts()                        # this node's ISA, before TensorFlow loads
    tf, itex = start_tensorflow(cfg.intel, node)   # ITEX before Horovod: loading it after aborts
    import horovod.tensorflow as hvd_tf
    import horovod.tensorflow.keras as hvd

    hvd.init()
    threads = int(os.environ["FMNIST_THREADS"])
    if cfg.intel.intra_op_threads == 0 and hvd.local_size() != launcher_local_size():
        threads = threads_for_rank(0, len(os.sched_getaffinity(0)), os.cpu_count() or 1, hvd.local_size(),
                                   slurm_cpus_per_task())
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(cfg.intel.inter_op_threads)
    # Every rank's CPU, gathered: the least capable node decides, so ranks never mix numerics, and
    # an impossible bf16 request fails on every rank here, before the first op could abort.
    nodes = hvd_tf.allgather_object(node)
    precision = set_precision(tf, cfg.intel.mixed_precision, nodes, itex)
    rt = Runtime(hvd=hvd, rank=hvd.rank(), size=hvd.size(), local_rank=hvd.local_rank(),
                 local_size=hvd.local_size(), host=socket.gethostname(), threads=threads,
                 hvd_tf=hvd_tf)
    rt.environment = detect_environment(tf, hvd, threads, cfg, itex, precision, nodes)
    return rt


def start_tensorflow(intel: Any, node: dict) -> tuple[Any, dict]:
    """Set the load-time environment, import TensorFlow and load ITEX (as intel.itex and the node allow)."""
    configure_environment(intel)
    import tensorflow as tf

    return tf, load_itex(intel.itex, node)


def set_precision(tf: Any, requested: str, nodes: list[dict], itex: dict) -> dict:
    """Resolve intel.mixed_precision against every rank's node and apply it (Keras policy; ITEX's
    auto mixed precision was switched on at load time by configure_environment)."""
    precision = cpu.resolve_precision(requested, nodes)
    if precision["chosen"] == "itex_bf16" and not itex["loaded"]:
        raise SetupError(f"intel.mixed_precision=itex_bf16 needs ITEX, which is not loaded ({itex['reason']})")
    if precision["chosen"] == "keras_bf16":
        tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    return precision


def _itex_imported(requested: str) -> dict:
    try:
        import intel_extension_for_tensorflow as itex
    except Exception as e:  # ImportError, or the plugin failing to register with this TF
        if requested == "on":
            raise SetupError(f"intel.itex=on but Intel Extension for TensorFlow did not load: {e}") from e
        return {"loaded": False, "version": None, "reason": f"not loaded: {e}"}
    return {"loaded": True, "version": getattr(itex, "__version__", "unknown"), "reason": ""}


def detect_environment(tf: Any, hvd: Any, threads: int, cfg: Any, itex: dict, precision: dict,
                       nodes: list[dict]) -> dict:
    """Facts detected at run time (not what was asked for)."""
    import horovod

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
        "bound_by": "fmnist-dist (intel.bind=auto)" if BOUND_BY_US else (
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
    """TF 2.15 on x86 enables oneDNN unless TF_ENABLE_ONEDNN_OPTS is 0/false."""
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())
