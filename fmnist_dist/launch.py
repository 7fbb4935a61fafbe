"""From what a batch scheduler hands a job to one launch command: `fmnist-dist launch-plan`.

The job scripts (jobs/train.pbs, jobs/train.slurm) only activate the environment, run
`python -m fmnist_dist launch-plan --scheduler pbs|slurm --format shell`, `eval` what it prints
(RUN_DIR and the LAUNCH array) and run "${LAUNCH[@]}". Everything with logic lives here:

* the allocation: PBS's node file (one line per slot) or Slurm's SLURM_JOB_NODELIST and
  SLURM_TASKS_PER_NODE, as hosts with slots;
* the ranks (default: every slot; more than the slots is an error) and where they go (slots filled
  in node-file order, as `mpirun --map-by slot` does);
* threads per rank: the cores of a node divided by the ranks on it (the rule the training process
  applies itself, see environment.threads_for_rank), enforced by binding each rank to that many cores;
* the run directory: runs/$PBS_JOBID or runs/$SLURM_JOB_ID (a rerun of an interrupted job reuses it);
* the command, in the dialect of the MPI Horovod was built against (mpi.py): Open MPI's mpirun
  (hostfile, mapping and binding, -x for the environment), the Hydra mpirun of MPICH and Intel MPI
  (machinefile, -bind-to or Intel's pinning; Hydra passes the whole environment), horovodrun
  (host:slots) or, under Slurm, srun with the PMI the MPI speaks (Open MPI: pmix; MPICH, Intel MPI:
  pmi2) when this Slurm has that plugin;
* checks before anything starts: the Python runs and imports horovod.tensorflow, the launcher is on
  PATH and belongs to the MPI Horovod was built against, the node file is readable, the config is valid;
* under PBS (Torque, PBS Professional, OpenPBS), what the job asked for, from `qstat -f $PBS_JOBID`
  (Torque's PBS_* variables where qstat does not answer): a train.time_limit shortly before the
  walltime, so that the training checkpoints and exits 75 by itself instead of being killed (PBS
  gives SIGTERM only kill_delay seconds, 10 by default, before SIGKILL; Slurm warns the job with
  --signal instead), the cores of a chunk (ompthreads, NCPUS), and the qsub command that continues
  the run with the same request (RESUBMIT);
* under PBS, mpirun started with SIGTERM blocked (SHIELD): PBS signals every process of the job's
  session at once, and Open MPI's mpirun answers SIGTERM by killing the ranks within two seconds, before
  they can checkpoint. The ranks (mpirun unblocks signals in them) take the SIGTERM as a stop request.

A failed check prints one line, `fmnist-dist: error: ...`, and exits 2, so the job fails visibly.
Extra arguments for mpirun (e.g. the network to use) come from FMNIST_MPI_ARGS, split like a shell.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Callable

from . import config as config_mod
from . import environment, mpi
from .errors import ConfigError, LaunchError
from .reporting.report import report_status

WALLTIME_MARGIN = 120   # seconds before a PBS walltime at which training stops (like Slurm's --signal=B:USR1@120)
MPI_ARGS_VAR = "FMNIST_MPI_ARGS"
QSTAT_TIMEOUT = 30      # seconds for `qstat -f` (a busy PBS server answers in well under that)
# Resource_List entries a PBS Pro server derives from the select statement, or that belong in a chunk:
# asked for again beside select, qsub refuses them ("Cannot be used with select or place").
CHUNK_RESOURCES = frozenset({"ncpus", "mem", "vmem", "ngpus", "naccelerators", "accelerator", "accelerator_model",
                             "accelerator_memory", "mpiprocs", "ompthreads", "nodect", "nodes", "neednodes",
                             "host", "vnode", "arch"})
TORQUE_DERIVED = frozenset({"nodect", "neednodes"})     # Torque's Resource_List entries it computes itself
# The job script's own variables a resubmission passes on (qsub -v), besides RUN_DIR, CONFIG, EXTRA, NP, LAUNCHER.
RESUBMIT_VARS = ("VENV", "CONDA_ENV", MPI_ARGS_VAR)
# Runs argv[1:] with SIGTERM blocked: a blocked signal stays blocked across exec (mpirun installs a
# handler, which would undo SIG_IGN, but never unblocks it), and mpirun unblocks it in the ranks.
SIGTERM_BLOCKED = ("import os, signal, sys; signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM]); "
                   "os.execvp(sys.argv[1], sys.argv[1:])")
# Forwarded to every rank by mpirun (-x NAME forwards the current value; only names that are set).
FORWARD_VARS = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "VIRTUAL_ENV", "CONDA_PREFIX", "CONDA_DEFAULT_ENV",
                "TF_CPP_MIN_LOG_LEVEL", "OMP_NUM_THREADS", "KMP_AFFINITY", "KMP_BLOCKTIME")
FORWARD_PREFIXES = ("FMNIST_", "HOROVOD_", "ITEX_", "TF_ENABLE_")


@dataclass
class Plan:
    scheduler: str
    job_id: str
    launcher: str
    hosts: list[tuple[str, int]]            # the allocation: (host, slots), in node-file order
    placement: list[tuple[str, int]]        # (host, ranks) actually used
    ranks: int
    ranks_per_node: int
    cores_per_node: int
    threads_per_rank: int
    bind: bool
    run_dir: str
    rerun: bool
    hostfile: str | None
    command: list[str]
    preflight: list[str]                    # the same launch of `fmnist_dist preflight`, run first
    notes: list[str] = field(default_factory=list)
    mpi: str = "openmpi"                    # the MPI family the command line is written for (mpi.py)
    shield: list[str] = field(default_factory=list)   # runs the launch with SIGTERM blocked (PBS, mpirun)
    resubmit: str = ""                      # PBS: the qsub command that continues this run


@dataclass
class PbsJob:
    """What a PBS job asked for, besides its node file."""
    attributes: dict[str, str]              # `qstat -f $PBS_JOBID`; {} where qstat did not answer
    walltime: int | None                    # seconds
    walltime_from: str                      # where the walltime was read, for the log
    request: list[str]                      # qsub options asking for the same: -A, -q, -l ...


# ---------------------------------------------------------------------------------------------
# The allocation


def parse_nodefile(text: str, source: str = "node file") -> list[tuple[str, int]]:
    """PBS/Torque node file -> [(host, slots)] in first-seen order. One line per slot; blank lines
    and # comments are skipped; a line may also be `host slots=N` (an Open MPI hostfile)."""
    slots: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        host, *rest = line.split()
        count = 1
        for item in rest:
            m = re.fullmatch(r"(?:slots|np)=(\d+)", item)
            if not m:
                raise LaunchError(f"{source}, line {number}: cannot read {raw.strip()!r} "
                                  f"(expected one host name per line)")
            count = int(m.group(1))
        slots[host] = slots.get(host, 0) + count
    if not slots:
        raise LaunchError(f"{source}: no hosts in it")
    return list(slots.items())


def read_nodefile(path: str | None) -> list[tuple[str, int]]:
    if not path:
        raise LaunchError("PBS_NODEFILE is not set: not inside a PBS job? (submit with qsub, or set "
                          "PBS_NODEFILE to a file listing one host per slot)")
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise LaunchError(f"cannot read the node file PBS_NODEFILE={path}: {e.strerror or e}") from None
    return parse_nodefile(text, f"node file {path}")


def expand_hostlist(spec: str) -> list[str]:
    """Slurm's compressed host list -> names: 'n[01-03,07],gpu1' -> n01 n02 n03 n07 gpu1."""
    hosts: list[str] = []
    for item in _split_top_level(spec.strip()):
        m = re.search(r"\[([^\]]*)\]", item)
        if not m:
            hosts.append(item)
            continue
        head, tail = item[:m.start()], item[m.end():]
        for part in m.group(1).split(","):
            lo, _, hi = part.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise LaunchError(f"cannot read the Slurm host list {spec!r}")
            for n in range(int(lo), int(hi or lo) + 1):
                hosts.extend(expand_hostlist(f"{head}{n:0{len(lo)}d}{tail}"))
    return hosts


def _split_top_level(spec: str) -> list[str]:
    items, depth, current = [], 0, ""
    for ch in spec:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    items.append(current)
    return [i for i in items if i]


def parse_tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE '2(x3),1' -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for item in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise LaunchError(f"cannot read SLURM_TASKS_PER_NODE={spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def slurm_allocation(environ: dict[str, str]) -> list[tuple[str, int]]:
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    tasks = environ.get("SLURM_TASKS_PER_NODE") or environ.get("SLURM_JOB_TASKS_PER_NODE")
    if not nodelist or not tasks:
        raise LaunchError("SLURM_JOB_NODELIST / SLURM_TASKS_PER_NODE are not set: not inside a Slurm "
                          "allocation? (submit with sbatch)")
    hosts = expand_hostlist(nodelist)
    counts = parse_tasks_per_node(tasks)
    if len(counts) != len(hosts):
        raise LaunchError(f"SLURM_TASKS_PER_NODE={tasks!r} does not match the {len(hosts)} hosts "
                          f"of SLURM_JOB_NODELIST={nodelist!r}")
    return list(zip(hosts, counts))


def place(hosts: list[tuple[str, int]], ranks: int | None) -> list[tuple[str, int]]:
    """Ranks onto slots in host order (mpirun --map-by slot). Default: one rank per slot."""
    total = sum(n for _, n in hosts)
    if ranks is None:
        ranks = total
    if ranks < 1:
        raise LaunchError(f"NP={ranks}: the number of ranks must be at least 1")
    if ranks > total:
        layout = ", ".join(f"{h}:{n}" for h, n in hosts)
        raise LaunchError(f"NP={ranks} ranks requested but the job has only {total} slots ({layout}); "
                          f"ask the scheduler for more nodes/slots or lower NP")
    placement, left = [], ranks
    for host, n in hosts:
        if left == 0:
            break
        take = min(n, left)
        placement.append((host, take))
        left -= take
    return placement


def threads_per_rank(cores_per_node: int, ranks_per_node: int) -> int:
    """The cores of a node shared by its ranks; the same rule as the training process's own
    (environment.threads_for_rank) so the plan, the binding and the report agree."""
    return environment.threads_for_rank(0, cores_per_node, cores_per_node, ranks_per_node)


def local_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------
# PBS: what the job asked for (PBS Professional / OpenPBS and Torque)


def parse_qstat_full(text: str) -> dict[str, str]:
    """`qstat -f JOBID` -> {attribute: value}. A long value goes on over lines that start with a tab."""
    attributes: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        if line.startswith("\t") and name:
            attributes[name] += line[1:]
            continue
        key, sep, value = line.strip().partition(" = ")
        name = key if sep else None
        if name:
            attributes[name] = value
    return attributes


def query_qstat(job_id: str, environ: dict[str, str]) -> tuple[dict[str, str], str | None]:
    """The job's attributes from `qstat -f JOBID`, or ({}, why not)."""
    qstat = shutil.which("qstat", path=environ.get("PATH") or os.defpath)
    if not qstat:
        return {}, "qstat is not on PATH"
    try:
        proc = subprocess.run([qstat, "-f", job_id], env=dict(environ), capture_output=True, text=True,
                              timeout=QSTAT_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {}, f"qstat -f {job_id} failed: {e}"
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return {}, f"qstat -f {job_id} exited with status {proc.returncode}" + (f": {lines[-1]}" if lines else "")
    return parse_qstat_full(proc.stdout), None


def parse_walltime(text: str) -> int | None:
    """A PBS walltime in seconds: '01:00:00', '90:00', '3600', '1:00:00:00' (Torque's days); None if unreadable."""
    parts = text.strip().split(":")
    if len(parts) > 4 or not all(re.fullmatch(r"\d+(\.\d*)?", p) for p in parts):
        return None
    return int(sum(float(p) * unit for p, unit in zip(reversed(parts), (1, 60, 3600, 86400))))


def hms(seconds: int) -> str:
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def pbs_job(environ: dict[str, str], job_id: str | None, notes: list[str]) -> PbsJob:
    """The job's request from `qstat -f` (both dialects answer it), else from Torque's variables."""
    attributes, why_not = query_qstat(job_id, environ) if job_id else ({}, "PBS_JOBID is not set")
    walltime, walltime_from = job_walltime(environ, attributes, job_id or "")
    if walltime is None:
        notes.append(f"no walltime known ({why_not or 'qstat -f shows no Resource_List.walltime'}): the "
                     f"training is not stopped before it (give EXTRA=train.time_limit=SECONDS)")
    return PbsJob(attributes, walltime, walltime_from, pbs_request(environ, attributes))


def job_walltime(environ: dict[str, str], attributes: dict[str, str], job_id: str) -> tuple[int | None, str]:
    """Torque puts the walltime in PBS_WALLTIME; PBS Professional and OpenPBS only in `qstat -f`."""
    if environ.get("PBS_WALLTIME", "").strip().isdigit():
        return int(environ["PBS_WALLTIME"]), f"PBS_WALLTIME={environ['PBS_WALLTIME'].strip()}"
    value = attributes.get("Resource_List.walltime", "")
    return (parse_walltime(value) if value else None), f"qstat -f {job_id}"


def pbs_request(environ: dict[str, str], attributes: dict[str, str]) -> list[str]:
    """qsub options asking again for what this job has: account, queue (PBS_O_QUEUE: the queue it was
    submitted to, not the one a routing queue sent it on to) and resources."""
    resources = {k.split(".", 1)[1]: v for k, v in attributes.items() if k.startswith("Resource_List.")}
    options: list[str] = []
    account = attributes.get("Account_Name") or environ.get("PBS_ACCOUNT")
    if account:
        options += ["-A", account]
    if environ.get("PBS_O_QUEUE"):
        options += ["-q", environ["PBS_O_QUEUE"]]
    for name, value in requested_resources(resources or torque_resources(environ)).items():
        options += ["-l", f"{name}={value}"]
    return options


def torque_resources(environ: dict[str, str]) -> dict[str, str]:
    """Torque's variables as resources, where qstat did not answer (node properties are lost)."""
    resources = {}
    nodes, ppn = environ.get("PBS_NUM_NODES", ""), environ.get("PBS_NUM_PPN", "")
    if nodes.isdigit() and ppn.isdigit():
        resources["nodes"] = f"{nodes}:ppn={ppn}"
    if environ.get("PBS_WALLTIME", "").strip().isdigit():
        resources["walltime"] = hms(int(environ["PBS_WALLTIME"]))
    return resources


def requested_resources(resources: dict[str, str]) -> dict[str, str]:
    """The Resource_List entries to ask for again, in qsub's order: select and place (PBS Pro: not the
    job-wide sums the server derives from them) or nodes (Torque), walltime, then the rest (e.g. a
    site's filesystems)."""
    first, skip = (("select", "place", "walltime"), CHUNK_RESOURCES) if "select" in resources else \
        (("nodes", "walltime"), TORQUE_DERIVED)
    ordered = {name: resources[name] for name in first if name in resources}
    ordered.update({k: v for k, v in sorted(resources.items()) if k not in skip and k not in ordered})
    return ordered


def first_chunk(select: str) -> dict[str, str]:
    """'2:ncpus=4:mpiprocs=2+1:ncpus=2' -> {'ncpus': '4', 'mpiprocs': '2'} (the chunk count left out)."""
    return dict(item.split("=", 1) for item in select.split("+", 1)[0].split(":") if "=" in item)


def exec_host_cores(exec_host: str) -> dict[str, int]:
    """PBS Pro's exec_host -> the ncpus the job has on each host: 'n1/0*2+n1/1*2+n2/0*4' -> {n1: 4, n2: 4}
    (several chunks may share a host, e.g. select=4:ncpus=1 with place=pack)."""
    cores: dict[str, int] = {}
    for item in exec_host.split("+") if exec_host else []:
        m = re.fullmatch(r"\s*([^/\s]+)/\d+(?:\*(\d+))?\s*", item)
        if m:
            cores[m.group(1)] = cores.get(m.group(1), 0) + int(m.group(2) or 1)
    return cores


def pbs_cores(environ: dict[str, str], job: PbsJob, ranks_per_node: int, notes: list[str]) -> int:
    """The cores the job has on a node. PBS Pro: ompthreads per rank where the select statement gives
    it, else the ncpus of its chunks on each host (qstat's exec_host; the fewest, for a binding that
    fits every node), else NCPUS, which the mom sets to the first chunk's ncpus (as OMP_NUM_THREADS,
    which each rank then replaces with its own thread count). Torque gives whole nodes (DevCloud):
    this node's cores."""
    select = job.attributes.get("Resource_List.select", "")
    ompthreads = first_chunk(select).get("ompthreads", "")
    if ompthreads.isdigit() and int(ompthreads) > 0:
        notes.append(f"threads per rank from ompthreads={ompthreads} in the select statement")
        return int(ompthreads) * ranks_per_node
    per_host = exec_host_cores(job.attributes.get("exec_host", "")) if select else {}
    if per_host:
        notes.append(f"cores per node from exec_host = {job.attributes['exec_host']} (the chunks' ncpus)")
        return min(per_host.values())
    ncpus = environ.get("NCPUS", "").strip()
    if ncpus.isdigit() and int(ncpus) > 0:
        notes.append(f"cores per node from NCPUS={ncpus} (the chunk's ncpus)")
        return int(ncpus)
    return local_cores()


def resubmit_command(request: list[str], run_dir: str, variables: dict[str, str]) -> str:
    """The qsub command, typed from the project directory, that continues the run in run_dir with the
    job's request and its variables."""
    items = [("RUN_DIR", run_dir)] + [(k, v) for k, v in variables.items() if v]
    return shlex.join(["qsub", *request]) + " -v " + ",".join(f"{k}={qsub_v_value(v)}" for k, v in items) + \
        " jobs/train.pbs"


def qsub_v_value(value: str) -> str:
    """A value inside `qsub -v A=x,B=y`, shell-quoted: spaces and shell characters in double quotes, a
    comma (qsub's separator) in single quotes inside them, as PBS reads it."""
    if re.fullmatch(r"[\w@%+=:./-]+", value):
        return value
    inner = re.sub(r'(["\\$`])', r"\\\1", value)
    return f"\"'{inner}'\"" if "," in value else f'"{inner}"'


# ---------------------------------------------------------------------------------------------
# Run directory, checks


def job_run_dir(scheduler: str, job_id: str | None, workdir: str) -> str:
    var = "PBS_JOBID" if scheduler == "pbs" else "SLURM_JOB_ID"
    if not job_id:
        raise LaunchError(f"{var} is not set: not inside a {scheduler.upper()} job? "
                          f"(or give --run-dir / RUN_DIR)")
    if "/" in job_id or job_id in (".", ".."):
        raise LaunchError(f"{var}={job_id!r} cannot name a directory")
    return os.path.join(workdir, "runs", job_id)


def run_dir_state(run_dir: str) -> str:
    """'new', 'rerun' (holds an unfinished attempt: a PBS rerun or a Slurm requeue) or 'completed'."""
    status = report_status(run_dir)
    return "new" if status is None else ("completed" if status == "completed" else "rerun")


def check_python(python: str) -> str:
    """That `python` imports horovod.tensorflow; returns where its horovod package is."""
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise LaunchError(f"the Python to launch, {python}, does not exist or is not executable "
                          f"(activate the environment first: bash scripts/setup.sh makes .venv)")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    try:
        proc = subprocess.run([python, "-c", "import horovod.tensorflow, horovod; print(horovod.__path__[0])"],
                              env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        raise LaunchError(f"{python} -c 'import horovod.tensorflow' did not finish in 300 s") from None
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        why = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        raise LaunchError(f"{python} cannot import horovod.tensorflow ({why}); re-run bash scripts/setup.sh "
                          f"or activate the right environment")
    return proc.stdout.strip().splitlines()[-1]


def find_program(name: str, why: str) -> str:
    path = shutil.which(name)
    if not path:
        raise LaunchError(f"{name} not found on PATH ({why})")
    return path


def srun_mpi_plugins(srun: str = "srun") -> set[str]:
    """The PMI plugins this Slurm's srun offers (`srun --mpi=list`): pmix, pmi2, ..."""
    try:
        proc = subprocess.run([srun, "--mpi=list"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return mpi_plugins(proc.stdout + proc.stderr) if proc.returncode == 0 else set()


def mpi_plugins(text: str) -> set[str]:
    # Slurm 22.05: "MPI plugin types are...\n\tnone\n\tpmi2\n\tpmix\n..."; 23.x: "srun: pmix" lines.
    found = (re.fullmatch(r"(?:srun:\s*)?(pmix|pmi2)(?:_v\d+)?", line.strip()) for line in text.splitlines())
    return {m.group(1) for m in found if m}


# What srun must offer for each MPI: Open MPI 4 starts its ranks through PMIx; MPICH and Intel MPI
# through PMI-2 (Intel MPI then loads Slurm's libpmi2, named by I_MPI_PMI_LIBRARY).
SRUN_PMI = {"openmpi": "pmix", "mpich": "pmi2", "intel": "pmi2"}


def forwarded_env(environ: dict[str, str]) -> list[str]:
    names = [n for n in FORWARD_VARS if n in environ]
    names += sorted(n for n in environ if n.startswith(FORWARD_PREFIXES) and n not in names and n != MPI_ARGS_VAR)
    return names


def mpi_args(environ: dict[str, str]) -> list[str]:
    text = environ.get(MPI_ARGS_VAR, "")
    try:
        return shlex.split(text)
    except ValueError as e:
        raise LaunchError(f"{MPI_ARGS_VAR}={text!r}: {e}") from None


def walltime_limit(seconds: int | None) -> int | None:
    """train.time_limit for a job of `seconds` of walltime (None if unknown or under 10 s):
    WALLTIME_MARGIN seconds before it, or a fifth of it for jobs under 10 minutes."""
    if seconds is None or seconds < 10:
        return None
    return seconds - (WALLTIME_MARGIN if seconds >= 600 else seconds // 5)


def rank_command(python: str, subcommand: str, config: str, overrides: list[str], run_dir: str) -> list[str]:
    """What each rank runs. A rerun needs no flag: train resumes an unfinished run directory from
    its checkpoint."""
    cmd = [python, "-m", "fmnist_dist", subcommand, "--config", config, "--run-dir", run_dir]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def split_extra(extra: str) -> list[str]:
    """EXTRA='train.epochs=3 train.lr=0.002' -> ['train.epochs=3', 'train.lr=0.002']."""
    try:
        items = shlex.split(extra or "")
    except ValueError as e:
        raise LaunchError(f"EXTRA={extra!r}: {e}") from None
    for item in items:
        if "=" not in item:
            raise LaunchError(f"EXTRA: {item!r} is not KEY=VALUE (e.g. EXTRA=\"train.epochs=3 train.lr=0.002\")")
    return items


# ---------------------------------------------------------------------------------------------
# The plan


def make_plan(scheduler: str, environ: dict[str, str], *, workdir: str, python: str, config: str,
              extra: str = "", np: int | None = None, launcher: str = "auto", run_dir: str | None = None,
              cores_per_node: int | None = None, check: bool = True, write: bool = True,
              srun_plugins: Callable[[], set[str]] = srun_mpi_plugins, mpi_family: str | None = None) -> Plan:
    """Everything the job script needs, or a LaunchError naming the first problem found. The steps
    run, and add their notes, in the order the job log prints them. The launch line is written for
    the MPI Horovod was built against (without check: mpi_family, else Open MPI)."""
    check_choices(scheduler, launcher)
    notes: list[str] = []
    hosts, job_id = allocation(scheduler, environ)
    job = pbs_job(environ, job_id, notes) if scheduler == "pbs" else None
    placement = place(hosts, requested_ranks(scheduler, environ, np))
    if job and sum(n for _, n in hosts) == 1:
        notes.append("the job has one slot, so one rank: ask for more with qsub -l select=NODES:ncpus=CORES:"
                     "mpiprocs=RANKS (PBS Professional, OpenPBS) or -l nodes=NODES:ppn=RANKS (Torque)")
    ranks_per_node = max(n for _, n in placement)
    if cores_per_node is None:
        cores_per_node = pbs_cores(environ, job, ranks_per_node, notes) if job else \
            node_cores(scheduler, environ, ranks_per_node)
    threads = threads_per_rank(cores_per_node, ranks_per_node)
    bind = ranks_per_node <= cores_per_node
    if not bind:
        notes.append(f"{ranks_per_node} ranks per node on {cores_per_node} cores: oversubscribed, "
                     f"ranks are not bound to cores")
    workdir = os.path.abspath(workdir)
    run_dir, rerun = usable_run_dir(scheduler, job_id, workdir, run_dir, notes)
    given_config, config = config, config if os.path.isabs(config) else os.path.join(workdir, config)
    overrides = rank_overrides(config, extra, job, notes)
    build = mpi.horovod_build(check_python(python)) if check else None
    family = mpi_family or (build.family if build else None) or "openmpi"
    launcher = choose_launcher(scheduler, launcher, family, srun_plugins, notes)
    extra_mpi = mpi_args(environ)
    ranks = sum(n for _, n in placement)
    hostfile = os.path.join(run_dir, "hostfile") if launcher == "mpirun" and scheduler == "pbs" else None
    if launcher == "srun":
        prefix = srun_prefix(ranks, threads, family, environ, extra_mpi, check, notes)
    elif launcher == "horovodrun":
        prefix = horovodrun_prefix(placement, extra_mpi, check)
    else:
        if check:
            mpi.check_match(build, mpi.launcher(find_program("mpirun", f"{mpi.NAMES[family]}'s launcher")))
        prefix = hydra_prefix(ranks, threads, bind, hostfile, family, extra_mpi) if family in mpi.HYDRA else \
            mpirun_prefix(ranks, threads, bind, hostfile, environ, extra_mpi, quick_exit=scheduler == "pbs")
    plan = Plan(scheduler=scheduler, job_id=job_id or "", launcher=launcher, hosts=hosts,
                placement=placement, ranks=ranks, ranks_per_node=ranks_per_node,
                cores_per_node=cores_per_node, threads_per_rank=threads, bind=bind, run_dir=run_dir,
                rerun=rerun, hostfile=hostfile, notes=notes, mpi=family,
                command=prefix + rank_command(python, "train", config, overrides, run_dir),
                preflight=prefix + rank_command(python, "preflight", config, overrides, run_dir))
    if job:
        add_pbs_stop(plan, job, python, job_variables(given_config, extra, np, launcher, environ))
    if write:
        write_files(plan)
    return plan


def check_choices(scheduler: str, launcher: str) -> None:
    if scheduler not in ("pbs", "slurm"):
        raise LaunchError(f"--scheduler {scheduler!r}: expected pbs or slurm")
    if launcher not in ("auto", "mpirun", "horovodrun", "srun"):
        raise LaunchError(f"LAUNCHER={launcher!r}: expected mpirun, horovodrun, srun or auto")
    if scheduler == "pbs" and launcher == "srun":
        raise LaunchError("LAUNCHER=srun only works under Slurm")


def allocation(scheduler: str, environ: dict[str, str]) -> tuple[list[tuple[str, int]], str | None]:
    """The job's (host, slots) and its id, as the scheduler hands them over."""
    if scheduler == "pbs":
        return read_nodefile(environ.get("PBS_NODEFILE")), environ.get("PBS_JOBID")
    return slurm_allocation(environ), environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")


def requested_ranks(scheduler: str, environ: dict[str, str], np: int | None) -> int | None:
    """NP, else Slurm's --ntasks, else None (every slot)."""
    if np is None and scheduler == "slurm" and environ.get("SLURM_NTASKS", "").isdigit():
        return int(environ["SLURM_NTASKS"])
    return np


def node_cores(scheduler: str, environ: dict[str, str], ranks_per_node: int) -> int:
    """Slurm reserves --cpus-per-task per rank; otherwise this node's cores (the nodes of one job are
    assumed alike; PBS: pbs_cores)."""
    cpus_per_task = environ.get("SLURM_CPUS_PER_TASK", "")
    if scheduler == "slurm" and cpus_per_task.isdigit():
        return int(cpus_per_task) * ranks_per_node
    return local_cores()


def usable_run_dir(scheduler: str, job_id: str | None, workdir: str, run_dir: str | None,
                   notes: list[str]) -> tuple[str, bool]:
    """(The run directory, whether it holds an unfinished attempt to resume); a completed run is an error."""
    run_dir = os.path.abspath(os.path.join(workdir, run_dir)) if run_dir else job_run_dir(scheduler, job_id, workdir)
    state = run_dir_state(run_dir)
    if state == "completed":
        raise LaunchError(f"{run_dir} already holds a completed run; set RUN_DIR to another directory")
    if state == "rerun":
        notes.append(f"{run_dir} holds an unfinished attempt of this job (rerun/requeue): training resumes "
                     f"from its newest checkpoint")
    return run_dir, state == "rerun"


def rank_overrides(config: str, extra: str, job: PbsJob | None, notes: list[str]) -> list[str]:
    """EXTRA's --set items, checked against the config, and under PBS a time limit before the walltime."""
    overrides = split_extra(extra)
    try:
        cfg = config_mod.load(config, overrides)
    except ConfigError as e:
        raise LaunchError(str(e)) from None
    limit = walltime_limit(job.walltime) if job else None
    if limit is not None and cfg["train"]["time_limit"] is None:
        overrides = overrides + [f"train.time_limit={limit}"]
        notes.append(f"train.time_limit={limit} s (walltime {hms(job.walltime)} from {job.walltime_from}): the "
                     f"training checkpoints and exits 75 before the walltime; a rerun resumes it")
    return overrides


def job_variables(config: str, extra: str, np: int | None, launcher: str, environ: dict[str, str]) -> dict[str, str]:
    """The job script's variables a resubmission passes on (those set, not the defaults)."""
    variables = {"CONFIG": "" if config == config_mod.DEFAULT_CONFIG else config, "EXTRA": extra.strip(),
                 "NP": "" if np is None else str(np), "LAUNCHER": "" if launcher in ("mpirun", "auto") else launcher}
    return variables | {name: environ.get(name, "") for name in RESUBMIT_VARS}


def add_pbs_stop(plan: Plan, job: PbsJob, python: str, variables: dict[str, str]) -> None:
    """How a PBS job stops: mpirun shielded from the session-wide SIGTERM, and the command that continues."""
    if plan.launcher == "mpirun":
        plan.shield = [python, "-c", SIGTERM_BLOCKED]
    else:
        plan.notes.append("horovodrun starts mpirun through /bin/sh, which unblocks SIGTERM: on qdel, preemption "
                          "or the walltime, mpirun ends the ranks before they checkpoint (train.time_limit still "
                          "stops the run cleanly before the walltime); LAUNCHER=mpirun does not have this problem")
    plan.resubmit = resubmit_command(job.request, plan.run_dir, variables)
    plan.notes.append(f"if this job ends early, continue with: {plan.resubmit}")


def choose_launcher(scheduler: str, launcher: str, family: str, srun_plugins: Callable[[], set[str]],
                    notes: list[str]) -> str:
    """LAUNCHER=auto: srun where Slurm offers the PMI this MPI speaks, else mpirun."""
    if launcher != "auto":
        return launcher
    if scheduler != "slurm":
        return "mpirun"
    pmi = SRUN_PMI[family]
    if not launcher_ok("srun") or pmi not in srun_plugins():
        notes.append(f"srun --mpi={pmi} (what {mpi.NAMES[family]} needs) is not available here: using mpirun "
                     f"inside the allocation")
    elif family == "intel" and not slurm_pmi2_library():
        notes.append("Slurm's PMI-2 library (libpmi2.so, which Intel MPI loads under srun) is not installed: "
                     "using mpirun inside the allocation")
    else:
        return "srun"
    return "mpirun"


def slurm_pmi2_library() -> str | None:
    """Slurm's libpmi2, for Intel MPI under srun (I_MPI_PMI_LIBRARY), from the loader's cache."""
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.findall(r"^\s*libpmi2\.so(?:\.\d+)*\s.*=>\s*(\S+)$", out, re.M)
    return found[0] if found else None


def srun_prefix(ranks: int, threads: int, family: str, environ: dict[str, str], extra_mpi: list[str],
                check: bool, notes: list[str]) -> list[str]:
    if check:
        find_program("srun", "Slurm's launcher")
    if extra_mpi:
        notes.append(f"{MPI_ARGS_VAR} is ignored by srun (set OMPI_MCA_*, MPIR_CVAR_* or I_MPI_* variables instead)")
    prefix = ["srun", f"--mpi={SRUN_PMI[family]}", f"--ntasks={ranks}", f"--cpus-per-task={threads}",
              "--kill-on-bad-exit=1"]
    if family == "intel" and not environ.get("I_MPI_PMI_LIBRARY"):
        prefix.append(f"--export=ALL,I_MPI_PMI_LIBRARY={slurm_pmi2_library() or 'libpmi2.so'}")
    return prefix


def horovodrun_prefix(placement: list[tuple[str, int]], extra_mpi: list[str], check: bool) -> list[str]:
    if check:
        find_program("horovodrun", "Horovod's launcher, installed in the environment by scripts/setup.sh")
        find_program("mpirun", "Open MPI: apt-get install openmpi-bin, or module load openmpi")
    ranks = sum(n for _, n in placement)
    prefix = ["horovodrun", "-np", str(ranks), "-H", ",".join(f"{h}:{n}" for h, n in placement)]
    return prefix + (["--mpi-args=" + shlex.join(extra_mpi)] if extra_mpi else [])


def mpirun_prefix(ranks: int, threads: int, bind: bool, hostfile: str | None, environ: dict[str, str],
                  extra_mpi: list[str], quick_exit: bool = False) -> list[str]:
    """Open MPI's mpirun: the hostfile under PBS (under Slurm it reads the allocation itself),
    binding, and -x for the environment every rank needs. quick_exit (PBS, whose SIGKILL follows its
    SIGTERM after kill_delay, 10 s by default): after a rank's exit 75, mpirun would spend twice
    odls_base_sigkill_timeout (1 s) signalling ranks that are already gone before it exits."""
    prefix = ["mpirun", "-np", str(ranks)] + (["--hostfile", hostfile] if hostfile else [])
    if quick_exit:
        prefix += ["--mca", "odls_base_sigkill_timeout", "0"]
    if bind:
        prefix += ["--map-by", f"slot:PE={threads}", "--bind-to", "core"]
    else:
        prefix += ["--map-by", "slot", "--bind-to", "none", "--oversubscribe"]
    prefix.append("--report-bindings")
    for name in forwarded_env(environ):
        prefix += ["-x", name]
    return prefix + extra_mpi


def hydra_prefix(ranks: int, threads: int, bind: bool, hostfile: str | None, family: str,
                 extra_mpi: list[str]) -> list[str]:
    """The Hydra mpirun of MPICH and Intel MPI: the machinefile under PBS (under Slurm Hydra reads the
    allocation), binding (MPICH: -bind-to; Intel MPI pins by I_MPI_PIN_DOMAIN, `-bind-to` is not
    its option). Hydra passes the whole environment to every rank; a PBS stop needs no quick exit:
    Hydra exits as soon as its ranks have."""
    prefix = ["mpirun", "-n", str(ranks)] + (["-machinefile", hostfile] if hostfile else [])
    if family == "intel":
        prefix += ["-genv", "I_MPI_PIN_DOMAIN", f"{threads}:compact"] if bind else ["-genv", "I_MPI_PIN", "0"]
    elif bind:
        prefix += ["-bind-to", f"core:{threads}"]
    return prefix + extra_mpi


def launcher_ok(name: str) -> bool:
    return shutil.which(name) is not None


def hostfile_text(placement: list[tuple[str, int]], family: str = "openmpi") -> str:
    """Exactly the slots this job uses on each host: an Open MPI hostfile, or a Hydra machinefile."""
    if family in mpi.HYDRA:
        return "".join(f"{host}:{n}\n" for host, n in placement)
    return "".join(f"{host} slots={n}\n" for host, n in placement)


def write_files(plan: Plan) -> None:
    try:
        os.makedirs(plan.run_dir, exist_ok=True)
        if plan.hostfile:
            with open(plan.hostfile, "w") as f:
                f.write(hostfile_text(plan.placement, plan.mpi))
    except OSError as e:
        raise LaunchError(f"cannot write the run directory {plan.run_dir}: {e.strerror or e}") from None


def describe(plan: Plan) -> list[str]:
    alloc = ", ".join(f"{h}:{n}" for h, n in plan.hosts)
    lines = [f"fmnist-dist launch-plan: {plan.scheduler} job {plan.job_id or '-'}: slots {alloc}",
             f"  ranks {plan.ranks} on {len(plan.placement)} node(s), up to {plan.ranks_per_node} per node, "
             f"{plan.threads_per_rank} thread(s) each ({plan.cores_per_node} cores per node)",
             f"  mpi     {mpi.NAMES[plan.mpi]}",
             f"  run dir {plan.run_dir}",
             f"  check   {shlex.join(plan.preflight)}",
             f"  launch  {shlex.join(plan.command)}"]
    lines += [f"  note: {n}" for n in plan.notes]
    return lines


def shell_assignments(plan: Plan) -> str:
    """What the job scripts eval: RUN_DIR, the PREFLIGHT, LAUNCH and SHIELD arrays and RESUBMIT, shell-quoted."""
    return (f"RUN_DIR={shlex.quote(plan.run_dir)}\n"
            f"PREFLIGHT=({' '.join(shlex.quote(a) for a in plan.preflight)})\n"
            f"LAUNCH=({' '.join(shlex.quote(a) for a in plan.command)})\n"
            f"SHIELD=({' '.join(shlex.quote(a) for a in plan.shield)})\n"
            f"RESUBMIT={shlex.quote(plan.resubmit)}\n")
