"""The process before TensorFlow loads: ranks and cores as the launcher announced them, threads per
rank, binding, and the variables TensorFlow, oneDNN, OpenMP, ITEX and Horovod read when they load.

`prepare` runs before anything imports TensorFlow: the command line calls it before it imports the
training code, and the benchmark's worker before it measures. Pure Python, in the base layer: the
command line, launch-plan and the preflight use it without loading the training code.
"""
from __future__ import annotations

import os
import re
import sys
import time
from typing import Any

from .lease import process_start

# Variables launchers set for "how many ranks share this node", in order of trust.
LOCAL_SIZE_VARS = ("OMPI_COMM_WORLD_LOCAL_SIZE", "HOROVOD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE")
RANK_VARS = ("OMPI_COMM_WORLD_RANK", "HOROVOD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID")
SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "HOROVOD_SIZE", "PMIX_SIZE", "PMI_SIZE")
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


def launcher_size(environ: dict[str, str] = os.environ) -> int:
    """Ranks in the job as the launcher announced it (1 when started without one)."""
    for name in SIZE_VARS:
        if environ.get(name, "").isdigit():
            return max(1, int(environ[name]))
    if environ.get("SLURM_STEP_ID") is not None and environ.get("SLURM_NTASKS", "").isdigit():
        return max(1, int(environ["SLURM_NTASKS"]))
    return 1


def launcher_nodes(environ: dict[str, str] = os.environ) -> int:
    """Nodes in the job as the launcher announced it: its ranks over the ranks of this node."""
    if environ.get("HOROVOD_CROSS_SIZE", "").isdigit():
        return max(1, int(environ["HOROVOD_CROSS_SIZE"]))
    return max(1, launcher_size(environ) // launcher_local_size(environ))


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


def thread_layout(threads: int, towers: int, intra_requested: int, inter_requested: int) -> tuple[int, int]:
    """(intra-op, inter-op) threads for a process of `threads` threads that carries `towers` simulated
    ranks. inter_requested 0 (auto): towers side by side, each op on one thread, when the process carries
    two or more and its intra-op count was not set, since one thread per op keeps every core busy
    without the ops' own fork and join (one process of 2 threads, 2 towers of 256: 42-47 ms a step in bf16
    against 53 ms with both threads inside each op, docs/results.md); else one inter-op thread."""
    if inter_requested:
        return threads, inter_requested
    if towers > 1 and threads > 1 and intra_requested == 0:
        inter = min(towers, threads)
        return max(1, threads // inter), inter
    return threads, 1


def configure_environment(intel: Any, environ: dict[str, str] = os.environ) -> dict[str, str]:
    """Set the variables TensorFlow, oneDNN, OpenMP and ITEX read at load time. Returns them."""
    local_size = launcher_local_size(environ)
    if intel.bind == "auto":
        cores = cores_to_bind(os.sched_getaffinity(0), os.cpu_count() or 1, local_size, launcher_local_rank(environ))
        if cores:
            os.sched_setaffinity(0, cores)
            environ["FMNIST_BOUND_BY"] = "fmnist-dist (intel.bind=auto)"
    threads = threads_for_rank(intel.intra_op_threads, len(os.sched_getaffinity(0)),
                               os.cpu_count() or 1, local_size, slurm_cpus_per_task(environ))
    settings = {
        "TF_ENABLE_ONEDNN_OPTS": "1" if intel.onednn else "0",
        "OMP_NUM_THREADS": str(threads),
        "KMP_AFFINITY": intel.kmp_affinity,
        "KMP_BLOCKTIME": str(intel.kmp_blocktime),
        # 3, not 2: TF 2.15 logs its CUDA plugins' "Unable to register cuDNN/cuFFT/cuBLAS factory"
        # at ERROR level on every import, GPU or not, and reads the level once, at its first message
        # (during the import), so no level or later change tells them from other C++ ERROR lines.
        # The cost: TensorFlow's C++ ERROR lines are hidden too; an error that stops the run still
        # reaches the log as a Python exception carrying its text, and FATAL still prints. A level
        # the user sets (e.g. 2 to see C++ errors) always wins.
        "TF_CPP_MIN_LOG_LEVEL": environ.get("TF_CPP_MIN_LOG_LEVEL", "3"),
        "FMNIST_THREADS": str(threads),
    }
    if intel.mixed_precision == "itex_bf16":
        settings.update({"ITEX_AUTO_MIXED_PRECISION": "1", "ITEX_AUTO_MIXED_PRECISION_DATA_TYPE": "BFLOAT16"})
    environ.update(settings)
    return settings


def prepare(cfg: Any) -> None:
    """Before TensorFlow loads: threads, binding, oneDNN/ITEX switches, Horovod's timeline.
    Idempotent (a second call finds the affinity it set and changes nothing)."""
    configure_environment(cfg.intel)
    request_timeline(cfg)
    if cfg.train.stall_timeout:
        # Gloo ends a collective after 30 s with a traceback; the stall watchdog must speak first,
        # naming the rank (an explicit HOROVOD_GLOO_TIMEOUT_SECONDS is kept).
        os.environ.setdefault("HOROVOD_GLOO_TIMEOUT_SECONDS", str(int(cfg.train.stall_timeout * 2 + 60)))


def request_timeline(cfg: Any, environ: dict[str, str] = os.environ) -> None:
    """Ask Horovod for a dynamic timeline when report.timeline is on (and the launcher did not
    already set HOROVOD_TIMELINE): Horovod reads it when it starts."""
    if getattr(getattr(cfg, "report", None), "timeline", False) and not environ.get("HOROVOD_TIMELINE"):
        environ["HOROVOD_TIMELINE"] = "DYNAMIC"


def itex_dir() -> str:
    """Where set-up installs ITEX: outside site-packages, so that loading it is our choice."""
    return os.environ.get("FMNIST_ITEX_DIR") or os.path.join(sys.prefix, "itex")


def seconds_since_process_start(now_perf: float) -> float:
    """How long this process ran before `now_perf` (interpreter, imports): its start time since boot
    (lease.process_start) against the uptime."""
    start_ticks = process_start(os.getpid())
    if start_ticks is None:
        return 0.0
    try:
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    ran = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    return max(0.0, ran - (time.perf_counter() - now_perf))
