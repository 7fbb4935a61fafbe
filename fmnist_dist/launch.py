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
* the command: mpirun (hostfile, mapping and binding, -x for the environment), horovodrun
  (host:slots) or, under Slurm, srun --mpi=pmix when this Slurm has the PMIx plugin;
* checks before anything starts: the Python runs and imports horovod.tensorflow, the launcher is on
  PATH, the node file is readable, the config is valid;
* under PBS, a train.time_limit shortly before the job's walltime (PBS_WALLTIME), so that the
  training checkpoints and exits 75 by itself instead of being killed (PBS gives SIGTERM only
  seconds before SIGKILL); Slurm warns the job with --signal instead.

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
from . import environment
from .errors import ConfigError, LaunchError
from .reporting.report import report_status

WALLTIME_MARGIN = 120   # seconds before a PBS walltime at which training stops (like Slurm's --signal=B:USR1@120)
MPI_ARGS_VAR = "FMNIST_MPI_ARGS"
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


def check_python(python: str) -> None:
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise LaunchError(f"the Python to launch, {python}, does not exist or is not executable "
                          f"(activate the environment first: bash scripts/setup.sh makes .venv)")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    try:
        proc = subprocess.run([python, "-c", "import horovod.tensorflow"], env=env, capture_output=True,
                              text=True, timeout=300)
    except subprocess.TimeoutExpired:
        raise LaunchError(f"{python} -c 'import horovod.tensorflow' did not finish in 300 s") from None
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        why = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        raise LaunchError(f"{python} cannot import horovod.tensorflow ({why}); re-run bash scripts/setup.sh "
                          f"or activate the right environment")


def find_program(name: str, why: str) -> str:
    path = shutil.which(name)
    if not path:
        raise LaunchError(f"{name} not found on PATH ({why})")
    return path


def check_open_mpi(mpirun: str) -> None:
    """The mpirun command line built here is Open MPI's (the MPI Horovod is built against by
    scripts/setup.sh); Intel MPI's or MPICH's mpirun would misread it."""
    try:
        proc = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=60)
        version = (proc.stdout + proc.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LaunchError(f"{mpirun} --version failed: {e}") from None
    if "Open MPI" not in version and "OpenRTE" not in version:
        first = version.splitlines()[0] if version else "no version output"
        raise LaunchError(f"{mpirun} is not Open MPI ({first}): use LAUNCHER=horovodrun, which knows "
                          f"other MPIs' options, or put Open MPI's mpirun first on PATH")


def srun_has_pmix(srun: str = "srun") -> bool:
    """Whether this Slurm offers `--mpi=pmix` (Debian's Open MPI 4.1 is built --with-pmix)."""
    try:
        proc = subprocess.run([srun, "--mpi=list"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and mpi_list_has_pmix(proc.stdout + proc.stderr)


def mpi_list_has_pmix(text: str) -> bool:
    # Slurm 22.05: "MPI plugin types are...\n\tnone\n\tpmi2\n\tpmix\n..."; 23.x: "srun: pmix" lines.
    return any(re.fullmatch(r"(srun:\s*)?pmix(_v\d+)?", line.strip()) for line in text.splitlines())


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


def walltime_limit(walltime: str) -> int | None:
    """train.time_limit for a job of `walltime` seconds (PBS_WALLTIME; None if unset or unreadable):
    WALLTIME_MARGIN seconds before it, or a fifth of it for jobs under 10 minutes."""
    if not walltime.strip().isdigit() or int(walltime) < 10:
        return None
    seconds = int(walltime)
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
              has_pmix: Callable[[], bool] = srun_has_pmix) -> Plan:
    """Everything the job script needs, or a LaunchError naming the first problem found. The steps
    run, and add their notes, in the order the job log prints them."""
    check_choices(scheduler, launcher)
    notes: list[str] = []
    hosts, job_id = allocation(scheduler, environ)
    placement = place(hosts, requested_ranks(scheduler, environ, np))
    ranks_per_node = max(n for _, n in placement)
    if cores_per_node is None:
        cores_per_node = node_cores(scheduler, environ, ranks_per_node)
    threads = threads_per_rank(cores_per_node, ranks_per_node)
    bind = ranks_per_node <= cores_per_node
    if not bind:
        notes.append(f"{ranks_per_node} ranks per node on {cores_per_node} cores: oversubscribed, "
                     f"ranks are not bound to cores")
    workdir = os.path.abspath(workdir)
    run_dir, rerun = usable_run_dir(scheduler, job_id, workdir, run_dir, notes)
    config = config if os.path.isabs(config) else os.path.join(workdir, config)
    overrides = rank_overrides(scheduler, environ, config, extra, notes)
    if check:
        check_python(python)
    launcher = choose_launcher(scheduler, launcher, has_pmix, notes)
    extra_mpi = mpi_args(environ)
    ranks = sum(n for _, n in placement)
    hostfile = os.path.join(run_dir, "hostfile") if launcher == "mpirun" and scheduler == "pbs" else None
    if launcher == "srun":
        prefix = srun_prefix(ranks, threads, extra_mpi, check, notes)
    elif launcher == "horovodrun":
        prefix = horovodrun_prefix(placement, extra_mpi, check)
    else:
        prefix = mpirun_prefix(ranks, threads, bind, hostfile, environ, extra_mpi, check)
    plan = Plan(scheduler=scheduler, job_id=job_id or "", launcher=launcher, hosts=hosts,
                placement=placement, ranks=ranks, ranks_per_node=ranks_per_node,
                cores_per_node=cores_per_node, threads_per_rank=threads, bind=bind, run_dir=run_dir,
                rerun=rerun, hostfile=hostfile, notes=notes,
                command=prefix + rank_command(python, "train", config, overrides, run_dir),
                preflight=prefix + rank_command(python, "preflight", config, overrides, run_dir))
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
    """Slurm reserves --cpus-per-task per rank; PBS gives whole nodes (DevCloud), whose size is this
    node's (the nodes of one job are assumed alike)."""
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


def rank_overrides(scheduler: str, environ: dict[str, str], config: str, extra: str, notes: list[str]) -> list[str]:
    """EXTRA's --set items, checked against the config, and under PBS a time limit before the walltime."""
    overrides = split_extra(extra)
    try:
        cfg = config_mod.load(config, overrides)
    except ConfigError as e:
        raise LaunchError(str(e)) from None
    limit = walltime_limit(environ.get("PBS_WALLTIME", "")) if scheduler == "pbs" else None
    if limit is not None and cfg["train"]["time_limit"] is None:
        overrides = overrides + [f"train.time_limit={limit}"]
        notes.append(f"train.time_limit={limit} s (PBS_WALLTIME={environ['PBS_WALLTIME']} s): the training "
                     f"checkpoints and exits 75 before the walltime; a rerun resumes it")
    return overrides


def choose_launcher(scheduler: str, launcher: str, has_pmix: Callable[[], bool], notes: list[str]) -> str:
    """LAUNCHER=auto: srun where Slurm offers PMIx, else mpirun."""
    if launcher != "auto":
        return launcher
    if scheduler == "slurm" and launcher_ok("srun") and has_pmix():
        return "srun"
    if scheduler == "slurm":
        notes.append("srun --mpi=pmix is not available here: using mpirun inside the allocation")
    return "mpirun"


def srun_prefix(ranks: int, threads: int, extra_mpi: list[str], check: bool, notes: list[str]) -> list[str]:
    if check:
        find_program("srun", "Slurm's launcher")
    if extra_mpi:
        notes.append(f"{MPI_ARGS_VAR} is ignored by srun (set OMPI_MCA_* variables instead)")
    return ["srun", "--mpi=pmix", f"--ntasks={ranks}", f"--cpus-per-task={threads}", "--kill-on-bad-exit=1"]


def horovodrun_prefix(placement: list[tuple[str, int]], extra_mpi: list[str], check: bool) -> list[str]:
    if check:
        find_program("horovodrun", "Horovod's launcher, installed in the environment by scripts/setup.sh")
        find_program("mpirun", "Open MPI: apt-get install openmpi-bin, or module load openmpi")
    ranks = sum(n for _, n in placement)
    prefix = ["horovodrun", "-np", str(ranks), "-H", ",".join(f"{h}:{n}" for h, n in placement)]
    return prefix + (["--mpi-args=" + shlex.join(extra_mpi)] if extra_mpi else [])


def mpirun_prefix(ranks: int, threads: int, bind: bool, hostfile: str | None, environ: dict[str, str],
                  extra_mpi: list[str], check: bool) -> list[str]:
    """Open MPI's mpirun: the hostfile under PBS (under Slurm it reads the allocation itself),
    binding, and -x for the environment every rank needs."""
    if check:
        check_open_mpi(find_program("mpirun", "Open MPI: apt-get install openmpi-bin, or module load openmpi"))
    prefix = ["mpirun", "-np", str(ranks)] + (["--hostfile", hostfile] if hostfile else [])
    if bind:
        prefix += ["--map-by", f"slot:PE={threads}", "--bind-to", "core"]
    else:
        prefix += ["--map-by", "slot", "--bind-to", "none", "--oversubscribe"]
    prefix.append("--report-bindings")
    for name in forwarded_env(environ):
        prefix += ["-x", name]
    return prefix + extra_mpi


def launcher_ok(name: str) -> bool:
    return shutil.which(name) is not None


def hostfile_text(placement: list[tuple[str, int]]) -> str:
    """Open MPI hostfile: exactly the slots this job uses on each host."""
    return "".join(f"{host} slots={n}\n" for host, n in placement)


def write_files(plan: Plan) -> None:
    try:
        os.makedirs(plan.run_dir, exist_ok=True)
        if plan.hostfile:
            with open(plan.hostfile, "w") as f:
                f.write(hostfile_text(plan.placement))
    except OSError as e:
        raise LaunchError(f"cannot write the run directory {plan.run_dir}: {e.strerror or e}") from None


def describe(plan: Plan) -> list[str]:
    alloc = ", ".join(f"{h}:{n}" for h, n in plan.hosts)
    lines = [f"fmnist-dist launch-plan: {plan.scheduler} job {plan.job_id or '-'}: slots {alloc}",
             f"  ranks {plan.ranks} on {len(plan.placement)} node(s), up to {plan.ranks_per_node} per node, "
             f"{plan.threads_per_rank} thread(s) each ({plan.cores_per_node} cores per node)",
             f"  run dir {plan.run_dir}",
             f"  check   {shlex.join(plan.preflight)}",
             f"  launch  {shlex.join(plan.command)}"]
    lines += [f"  note: {n}" for n in plan.notes]
    return lines


def shell_assignments(plan: Plan) -> str:
    """What the job scripts eval: RUN_DIR and the LAUNCH array, shell-quoted."""
    return (f"RUN_DIR={shlex.quote(plan.run_dir)}\n"
            f"PREFLIGHT=({' '.join(shlex.quote(a) for a in plan.preflight)})\n"
            f"LAUNCH=({' '.join(shlex.quote(a) for a in plan.command)})\n")
