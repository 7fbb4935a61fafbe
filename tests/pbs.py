"""The environment a PBS batch job sees, for running jobs/train.pbs as PBS runs it (no PBS server
is packaged in Debian): Torque's (pbs_job_env), and PBS Professional / OpenPBS's with its qsub, qstat,
qrerun and signals (OpenPBS)."""
from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
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


# ---------------------------------------------------------------------------------------------
# PBS Professional / OpenPBS: just enough of a server and a mom, on this one node


KILL_DELAY = 10        # OpenPBS's default kill_delay: SIGTERM to the job, SIGKILL this many seconds later
QSUB_OPTIONS = ("-l", "-v", "-A", "-q")      # the options these tests submit with (others are refused)
QSTAT = """#!/bin/bash
# qstat -f JOBID, answered from the jobs the test submitted (no PBS server can be installed here)
[ "${1:-}" = -f ] && [ -n "${2:-}" ] || { echo "usage: qstat -f JOBID" >&2; exit 2; }
answer="$(dirname "$0")/../server/$2"
[ -f "$answer" ] || { echo "qstat: Unknown Job Id $2" >&2; exit 1; }
cat "$answer"
"""
QRERUN = """#!/bin/bash
# qrerun as an OpenPBS server answers an ordinary user
echo "qrerun: Unauthorized Request  ${1:-}" >&2
exit 1
"""


@dataclass
class Submission:
    job_id: str
    argv: list[str]                 # the qsub command line
    env: dict[str, str]             # the job's environment, as the mom builds it
    resources: dict[str, str]       # Resource_List: the command line's over the script's #PBS -l
    script: Path                    # the mom's copy of the job script

    @property
    def run_dir(self) -> Path:
        return Path(self.env.get("RUN_DIR") or Path(self.env["PBS_O_WORKDIR"]) / "runs" / self.job_id)


class OpenPBS:
    """jobs/train.pbs submitted and run as OpenPBS 23 does it, on this one node: qsub's -l merged over
    the script's `#PBS -l` (and `nodes` refused beside `select`, as qsub does), the mom's environment
    (PBS_NODEFILE with one line per MPI process, NCPUS and OMP_NUM_THREADS, no PBS_WALLTIME, TMPDIR),
    `qstat -f JOBID` answered with the job's attributes, qrerun refused as to an ordinary user, the
    job in a session of its own, and qdel/walltime/preemption as the mom does them: SIGTERM to every
    process of the session at once, SIGKILL to what is left kill_delay seconds later. `node_env`: what
    every job gets from the node itself (e.g. Open MPI's network settings)."""

    def __init__(self, root: Path, host: str, workdir: Path, node_env: dict[str, str] | None = None,
                 queue: str = "workq"):
        self.root, self.host, self.workdir, self.queue = root, host, workdir, queue
        self.node_env = node_env or {}
        self.bin, self.server, self.home = root / "bin", root / "server", root / "home"
        for path in (self.bin, self.server, self.home, root / "mom_priv" / "jobs", root / "aux"):
            path.mkdir(parents=True, exist_ok=True)
        for name, text in (("qstat", QSTAT), ("qrerun", QRERUN)):
            (self.bin / name).write_text(text)
            (self.bin / name).chmod(0o755)

    def qsub(self, argv: list[str]) -> Submission:
        """Accept a `qsub ... jobs/train.pbs` command line (as the user types it, from the project
        directory), and make the job ready to run."""
        options, script = parse_qsub(argv)
        resources = script_resources(self.workdir / script)
        resources.update(dict(item.split("=", 1) for value in options.get("-l", []) for item in value.split(",")))
        if "select" in resources and "nodes" in resources:
            raise ValueError("qsub: Cannot be used with select or place: nodes")
        resources.setdefault("select", "1:ncpus=1")
        resources.setdefault("place", "free")
        job_id = f"{os.getpid() % 10000}{int(time.time() * 1000) % 10**6}.pbs-server"
        copy = self.root / "mom_priv" / "jobs" / f"{job_id}.SC"
        copy.write_text((self.workdir / script).read_text())
        chunks = select_chunks(resources["select"])
        nodefile = write_nodefile(self.root / "aux" / job_id,
                                  [self.host for chunk in chunks for _ in range(chunk["mpiprocs"])])
        variables = dict(item.split("=", 1) for value in options.get("-v", []) for item in value.split(","))
        account = (options.get("-A") or [""])[-1]
        queue = (options.get("-q") or [self.queue])[-1]
        env = self.job_env(job_id, nodefile, chunks[0]["threads"], queue, account, variables)
        (self.server / job_id).write_text(qstat_answer(job_id, self.host, queue, account, resources, chunks,
                                                       argv, env))
        return Submission(job_id, argv, env, resources, copy)

    def job_env(self, job_id: str, nodefile: Path, threads: int, queue: str, account: str,
                variables: dict[str, str]) -> dict[str, str]:
        tmpdir = self.root / f"pbs.{job_id}"
        tmpdir.mkdir()
        path = f"{self.bin}:{JOB_PATH}"          # the login shell's PATH with /opt/pbs/bin
        env = {
            "PATH": path, "HOME": str(self.home), "SHELL": "/bin/bash", "USER": "root", "LOGNAME": "root",
            "LANG": "C.UTF-8", "PBS_O_WORKDIR": str(self.workdir), "PBS_O_HOME": str(self.home),
            "PBS_O_PATH": path, "PBS_O_SHELL": "/bin/bash", "PBS_O_HOST": self.host, "PBS_O_SYSTEM": "Linux",
            "PBS_O_QUEUE": queue, "PBS_O_LOGNAME": "root", "PBS_O_LANG": "C.UTF-8",
            "PBS_ENVIRONMENT": "PBS_BATCH", "PBS_JOBID": job_id, "PBS_JOBNAME": "fmnist-dist",
            "PBS_QUEUE": queue, "PBS_JOBCOOKIE": "0123456789ABCDEF0123456789ABCDEF", "PBS_NODENUM": "0",
            "PBS_TASKNUM": "1", "PBS_MOMPORT": "15003", "PBS_NODEFILE": str(nodefile),
            "NCPUS": str(threads), "OMP_NUM_THREADS": str(threads), "TMPDIR": str(tmpdir),
            "PBS_JOBDIR": str(self.home), "ENVIRONMENT": "BATCH",
        }
        if account:
            env["PBS_ACCOUNT"] = account
        return {**env, **ROOT_MPI_ENV, **self.node_env, **variables}

    def start(self, job: Submission, log: Path) -> subprocess.Popen:
        """The mom starts the job script in a new session, from HOME, stdout and stderr joined (-j oe)."""
        with open(log, "w") as out:
            return subprocess.Popen(["bash", str(job.script)], cwd=self.home, env=job.env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self, session: int, frozen: list[int] | None = None, kill_delay: float = KILL_DELAY) -> tuple[float, bool]:
        """qdel, the walltime, preemption: SIGTERM to every process of the job's session at once,
        then SIGKILL to any left after kill_delay. Processes the caller stopped (SIGSTOP, so that the
        signal lands mid-training) are continued right after the SIGTERM. Returns the seconds until
        the session was empty and whether SIGKILL was needed."""
        start = time.monotonic()
        signal_processes(session_processes(session), signal.SIGTERM)
        signal_processes(frozen or [], signal.SIGCONT)
        while session_processes(session) and time.monotonic() - start < kill_delay:
            time.sleep(0.1)
        left = session_processes(session)
        signal_processes(left, signal.SIGKILL)
        return time.monotonic() - start, bool(left)


def parse_qsub(argv: list[str]) -> tuple[dict[str, list[str]], str]:
    """`qsub [-l R]... [-v VARS] [-A ACCOUNT] [-q QUEUE] SCRIPT` -> ({option: [values]}, script)."""
    assert argv[0] == "qsub", argv
    options: dict[str, list[str]] = {}
    args = argv[1:]
    while len(args) > 1:
        option, value, args = args[0], args[1], args[2:]
        if option not in QSUB_OPTIONS:
            raise ValueError(f"qsub option {option} is not emulated here: {shlex.join(argv)}")
        options.setdefault(option, []).append(value)
    if len(args) != 1:
        raise ValueError(f"qsub: no script at the end of {shlex.join(argv)}")
    return options, args[0]


def script_resources(script: Path) -> dict[str, str]:
    """The `#PBS -l` resources of a job script (qsub reads directives up to the first command)."""
    resources: dict[str, str] = {}
    for line in script.read_text().splitlines()[1:]:
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            break
        if stripped.startswith("#PBS -l "):
            resources.update(item.split("=", 1) for item in stripped[len("#PBS -l "):].split(","))
    return resources


def select_chunks(select: str) -> list[dict]:
    """'2:ncpus=4:mpiprocs=2' -> one dict per chunk: ncpus, mpiprocs (default 1), threads (ompthreads,
    default ncpus: what the mom puts in NCPUS and OMP_NUM_THREADS)."""
    chunks = []
    for spec in select.split("+"):
        count, *items = spec.split(":")
        values = dict(item.split("=", 1) for item in items)
        ncpus = int(values.get("ncpus", 1))
        chunk = {"ncpus": ncpus, "mpiprocs": int(values.get("mpiprocs", 1)),
                 "threads": int(values.get("ompthreads", ncpus))}
        chunks += [chunk] * int(count)
    if sum(c["ncpus"] for c in chunks) > (os.cpu_count() or 1):
        raise ValueError(f"job would never run on this one node (Can Never Run: Not enough total nodes available): "
                         f"select={select}")
    return chunks


def qstat_answer(job_id: str, host: str, queue: str, account: str, resources: dict[str, str],
                 chunks: list[dict], argv: list[str], env: dict[str, str]) -> str:
    """`qstat -f JOBID` as OpenPBS prints it: 4 spaces, `name = value`, long values wrapped onto lines
    that start with a tab."""
    ncpus = sum(c["ncpus"] for c in chunks)
    attributes = {"Job_Name": "fmnist-dist", "Job_Owner": f"root@{host}", "job_state": "R", "queue": queue,
                  "server": "pbs-server", **({"Account_Name": account} if account else {}),
                  "exec_host": f"{host}/0*{ncpus}", "exec_vnode": f"({host}:ncpus={ncpus})",
                  "Resource_List.mpiprocs": str(sum(c["mpiprocs"] for c in chunks)),
                  "Resource_List.ncpus": str(ncpus), "Resource_List.nodect": str(len(chunks)),
                  **{f"Resource_List.{k}": v for k, v in sorted(resources.items())},
                  "Submit_arguments": " ".join(argv[1:]),
                  "Variable_List": ",".join(f"{k}={v}" for k, v in env.items() if k.startswith("PBS_O_"))}
    lines = [f"Job Id: {job_id}"]
    for name, value in attributes.items():
        text = f"    {name} = {value}"
        lines.append("\n\t".join(text[i:i + 78] for i in range(0, len(text), 78)))
    return "\n".join(lines) + "\n"


def session_processes(session: int) -> list[int]:
    """The live processes of a session (a job started in its own), zombies left out."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[3]) == session and fields[0] != "Z":
                found.append(int(entry))
    return found


def signal_processes(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
