"""The environment a PBS batch job sees, for running jobs/train.pbs as PBS runs it (no PBS server
is packaged in Debian)."""
from __future__ import annotations


import os
import time
from pathlib import Path

from conftest import ROOT_MPI_ENV, short_host

# Default PATH of a batch job (Torque/OpenPBS and Slurm jobs start from a login-like PATH).
JOB_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def pbs_job_env(workdir: Path, job_id: str, nodefile: Path, hosts: list[str], **extra: str) -> dict[str, str]:
    """What Torque/OpenPBS puts in a batch job's environment (nothing of the submitting shell
    except what qsub -v passes; those come as **extra)."""
    env = {
        "PATH": JOB_PATH, "HOME": os.environ.get("HOME", "/root"), "SHELL": "/bin/bash",
        "USER": "root", "LOGNAME": "root", "LANG": "C.UTF-8",
        "PBS_O_WORKDIR": str(workdir), "PBS_O_HOME": os.environ.get("HOME", "/root"),
        "PBS_O_PATH": JOB_PATH, "PBS_O_SHELL": "/bin/bash", "PBS_O_HOST": short_host(),
        "PBS_O_SERVER": "pbs-server", "PBS_O_QUEUE": "batch", "PBS_O_LOGNAME": "root", "PBS_O_LANG": "C.UTF-8",
        "PBS_SERVER": "pbs-server", "PBS_QUEUE": "batch",
        "PBS_JOBID": job_id, "PBS_JOBNAME": "fmnist-dist", "PBS_JOBCOOKIE": "0123456789ABCDEF",
        "PBS_NODEFILE": str(nodefile), "PBS_NODENUM": "0", "PBS_TASKNUM": "1", "PBS_VNODENUM": "0",
        "PBS_MOMPORT": "15003", "PBS_ENVIRONMENT": "PBS_BATCH",
        "PBS_NUM_NODES": str(len(set(hosts))), "PBS_NUM_PPN": str(hosts.count(hosts[0])),
        "PBS_NP": str(len(hosts)), "PBS_WALLTIME": "3600", "PBS_GPUFILE": "", "PBS_MICFILE": "",
        "ENVIRONMENT": "BATCH",
    }
    env.update(ROOT_MPI_ENV)
    env.update(extra)
    return env


def write_nodefile(path: Path, hosts: list[str]) -> Path:
    path.write_text("".join(f"{h}\n" for h in hosts))
    return path


def unique_job_id(server: str = "pbs-server") -> str:
    return f"{os.getpid()}{int(time.time() * 1000) % 10**7}.{server}"
