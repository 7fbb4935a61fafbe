"""launch.py: node files and Slurm host lists, rank placement, threads, run directory, the launch
command and the one-line failures of `fmnist-dist launch-plan`."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from fmnist_dist import environment, launch, mpi
from fmnist_dist.launch import LaunchError

ROOT = Path(__file__).resolve().parents[1]


# --- the allocation ---------------------------------------------------------------------------

def test_nodefile_one_line_per_slot():
    assert launch.parse_nodefile("n1\nn1\nn2\nn2\n") == [("n1", 2), ("n2", 2)]


def test_nodefile_keeps_first_seen_order_and_skips_blanks_and_comments():
    text = "# Torque node file\n\ns002-n007.aidevcloud\ns001-n003.aidevcloud\n  s002-n007.aidevcloud  \n"
    assert launch.parse_nodefile(text) == [("s002-n007.aidevcloud", 2), ("s001-n003.aidevcloud", 1)]


def test_nodefile_also_reads_open_mpi_slots():
    assert launch.parse_nodefile("a slots=4\nb np=2\n") == [("a", 4), ("b", 2)]


@pytest.mark.parametrize("text, message", [
    ("", "no hosts in it"),
    ("\n# nothing\n", "no hosts in it"),
    ("a b c\n", "line 1: cannot read 'a b c'"),
])
def test_nodefile_errors(text, message):
    with pytest.raises(LaunchError, match=message):
        launch.parse_nodefile(text)


def test_read_nodefile_unset_and_missing(tmp_path):
    with pytest.raises(LaunchError, match="PBS_NODEFILE is not set"):
        launch.read_nodefile(None)
    with pytest.raises(LaunchError, match=r"cannot read the node file PBS_NODEFILE=.*nope: No such file"):
        launch.read_nodefile(str(tmp_path / "nope"))
    path = tmp_path / "nodes"
    path.write_text("x\nx\n")
    assert launch.read_nodefile(str(path)) == [("x", 2)]


@pytest.mark.parametrize("spec, hosts", [
    ("vm", ["vm"]),
    ("n[01-03,07],gpu1", ["n01", "n02", "n03", "n07", "gpu1"]),
    ("c[8-10]", ["c8", "c9", "c10"]),
    ("r[1-2]-n[1-2]", ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]),
])
def test_expand_slurm_hostlist(spec, hosts):
    assert launch.expand_hostlist(spec) == hosts


def test_tasks_per_node():
    assert launch.parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert launch.parse_tasks_per_node("4") == [4]
    with pytest.raises(LaunchError, match="cannot read SLURM_TASKS_PER_NODE"):
        launch.parse_tasks_per_node("2(x)")


def test_slurm_allocation():
    env = {"SLURM_JOB_NODELIST": "n[1-3]", "SLURM_TASKS_PER_NODE": "2(x2),1"}
    assert launch.slurm_allocation(env) == [("n1", 2), ("n2", 2), ("n3", 1)]
    with pytest.raises(LaunchError, match="does not match the 3 hosts"):
        launch.slurm_allocation({**env, "SLURM_TASKS_PER_NODE": "2"})
    with pytest.raises(LaunchError, match="not inside a Slurm allocation"):
        launch.slurm_allocation({})


# --- ranks and threads ------------------------------------------------------------------------

def test_place_default_is_every_slot():
    assert launch.place([("a", 2), ("b", 2)], None) == [("a", 2), ("b", 2)]


def test_place_fewer_ranks_fills_slots_in_order():
    assert launch.place([("a", 2), ("b", 2)], 3) == [("a", 2), ("b", 1)]
    assert launch.place([("a", 2), ("b", 2)], 1) == [("a", 1)]


def test_place_more_ranks_than_slots_is_an_error():
    with pytest.raises(LaunchError, match=r"NP=5 ranks requested but the job has only 4 slots \(a:2, b:2\)"):
        launch.place([("a", 2), ("b", 2)], 5)
    with pytest.raises(LaunchError, match="at least 1"):
        launch.place([("a", 2)], 0)


@pytest.mark.parametrize("cores", [1, 2, 4, 24, 48, 56])
@pytest.mark.parametrize("ranks_per_node", [1, 2, 3, 4, 8])
def test_threads_agree_with_what_each_rank_computes(cores, ranks_per_node):
    threads = launch.threads_per_rank(cores, ranks_per_node)
    assert threads == max(1, cores // ranks_per_node)
    # A rank bound to its `threads` cores (mpirun --map-by slot:PE=threads --bind-to core) ...
    if ranks_per_node <= cores and threads < cores:
        assert environment.threads_for_rank(0, threads, cores, ranks_per_node) == threads
    # ... and an unbound one sharing the node with its peers pick the same number.
    assert environment.threads_for_rank(0, cores, cores, ranks_per_node) == threads


@pytest.mark.parametrize("cores", [2, 4, 48])
@pytest.mark.parametrize("ranks_per_node", [2, 3, 4])
def test_unbound_ranks_take_disjoint_slices_of_the_node(cores, ranks_per_node):
    everything = set(range(cores))
    slices = [environment.cores_to_bind(everything, cores, ranks_per_node, r) for r in range(ranks_per_node)]
    if ranks_per_node > cores:
        assert slices == [None] * ranks_per_node
        return
    share = cores // ranks_per_node
    assert all(len(s) == share for s in slices)
    assert len(set().union(*map(set, slices))) == share * ranks_per_node, "no core is given twice"
    # each rank's thread count then follows its slice
    assert {environment.threads_for_rank(0, share, cores, ranks_per_node) for _ in slices} == {share}


def test_binding_is_left_alone_when_it_is_not_ours_to_choose():
    assert environment.cores_to_bind({0, 1}, 2, 1, 0) is None            # alone on the node
    assert environment.cores_to_bind({1}, 2, 2, 1) is None               # bound by mpirun or a cgroup
    assert environment.cores_to_bind({0, 1}, 2, 2, None) is None         # local rank unknown
    assert environment.launcher_local_rank({"OMPI_COMM_WORLD_LOCAL_RANK": "1"}) == 1
    assert environment.launcher_local_rank({"SLURM_LOCALID": "3", "SLURM_STEP_ID": "0"}) == 3
    assert environment.launcher_local_rank({"SLURM_LOCALID": "3"}) is None   # the batch shell, not a task


# --- run directory ----------------------------------------------------------------------------

def test_run_dir_from_job_id(tmp_path):
    assert launch.job_run_dir("pbs", "4242.v-qsvr-1", str(tmp_path)) == str(tmp_path / "runs" / "4242.v-qsvr-1")
    assert launch.job_run_dir("slurm", "77", "/w") == "/w/runs/77"
    with pytest.raises(LaunchError, match="PBS_JOBID is not set"):
        launch.job_run_dir("pbs", "", "/w")
    with pytest.raises(LaunchError, match="SLURM_JOB_ID is not set"):
        launch.job_run_dir("slurm", None, "/w")


def test_run_dir_state(tmp_path):
    assert launch.run_dir_state(str(tmp_path / "new")) == "new"
    (tmp_path / "report.json").write_text(json.dumps({"status": "running"}))
    assert launch.run_dir_state(str(tmp_path)) == "rerun"
    (tmp_path / "report.json").write_text(json.dumps({"status": "completed"}))
    assert launch.run_dir_state(str(tmp_path)) == "completed"


# --- whole plans ------------------------------------------------------------------------------

@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "default.yaml").write_text((ROOT / "configs" / "default.yaml").read_text())
    return tmp_path


def pbs_env(workdir, hosts, job_id="101.server", **extra):
    nodefile = workdir / "nodes"
    nodefile.write_text("".join(f"{h}\n" for h in hosts))
    return {"PBS_NODEFILE": str(nodefile), "PBS_JOBID": job_id, "PATH": "/usr/bin:/bin",
            "VIRTUAL_ENV": "/venv", "HOROVOD_LOG_LEVEL": "warning", "UNRELATED": "x", **extra}


def plan(scheduler, env, workdir, **kw):
    kw.setdefault("config", "configs/default.yaml")
    kw.setdefault("cores_per_node", 8)
    return launch.make_plan(scheduler, env, workdir=str(workdir), python="/venv/bin/python", check=False, **kw)


def test_pbs_plan_mpirun(workdir):
    p = plan("pbs", pbs_env(workdir, ["n1", "n1", "n2", "n2"]), workdir, extra="train.epochs=3 train.lr=0.002")
    run_dir = str(workdir / "runs" / "101.server")
    assert (p.ranks, p.ranks_per_node, p.threads_per_rank, p.run_dir) == (4, 2, 4, run_dir)
    assert p.command[:15] == ["mpirun", "-np", "4", "--hostfile", f"{run_dir}/hostfile",
                              "--mca", "odls_base_sigkill_timeout", "0",      # no 2 s teardown after an exit 75
                              "--map-by", "slot:PE=4", "--bind-to", "core", "--report-bindings", "-x", "PATH"]
    assert "-x VIRTUAL_ENV" in " ".join(p.command) and "-x HOROVOD_LOG_LEVEL" in " ".join(p.command)
    assert "UNRELATED" not in p.command
    train = p.command[p.command.index("/venv/bin/python"):]
    assert train == ["/venv/bin/python", "-m", "fmnist_dist", "train", "--config",
                     str(workdir / "configs" / "default.yaml"), "--run-dir", run_dir,
                     "--set", "train.epochs=3", "--set", "train.lr=0.002"]
    assert (workdir / "runs" / "101.server" / "hostfile").read_text() == "n1 slots=2\nn2 slots=2\n"
    # The preflight: the same launch, the same config and run directory, another subcommand.
    cut = p.command.index("train")
    assert p.preflight[:cut] == p.command[:cut] and p.preflight[cut] == "preflight"
    assert p.preflight[cut + 1:] == p.command[cut + 1:]


def test_pbs_plan_fewer_ranks_and_mpi_args(workdir):
    env = pbs_env(workdir, ["a", "a", "b", "b"], FMNIST_MPI_ARGS="--mca btl_tcp_if_include 10.0.0.0/24")
    p = plan("pbs", env, workdir, np=3)
    assert p.placement == [("a", 2), ("b", 1)]
    assert (workdir / "runs" / "101.server" / "hostfile").read_text() == "a slots=2\nb slots=1\n"
    i = p.command.index("btl_tcp_if_include") - 1
    assert p.command[i:i + 3] == ["--mca", "btl_tcp_if_include", "10.0.0.0/24"]
    assert p.command[i + 3] == "/venv/bin/python"
    assert "FMNIST_MPI_ARGS" not in p.command          # read here, not forwarded to the ranks


def test_pbs_plan_oversubscribed_is_not_bound(workdir):
    p = plan("pbs", pbs_env(workdir, ["a"] * 4), workdir, cores_per_node=2)
    assert not p.bind and p.threads_per_rank == 1
    assert ["--bind-to", "none"] == p.command[p.command.index("--bind-to"):p.command.index("--bind-to") + 2]
    assert any("oversubscribed" in n for n in p.notes)


def test_pbs_plan_horovodrun(workdir):
    env = pbs_env(workdir, ["a", "a", "b", "b"], FMNIST_MPI_ARGS="--mca btl ^openib")
    p = plan("pbs", env, workdir, launcher="horovodrun")
    assert p.command[:6] == ["horovodrun", "-np", "4", "-H", "a:2,b:2", "--mpi-args=--mca btl '^openib'"]  # horovodrun runs mpirun through a shell
    assert p.hostfile is None


def test_pbs_plan_errors(workdir):
    with pytest.raises(LaunchError, match="NP=3 ranks requested but the job has only 2 slots"):
        plan("pbs", pbs_env(workdir, ["a", "a"]), workdir, np=3)
    with pytest.raises(LaunchError, match="PBS_NODEFILE is not set"):
        plan("pbs", {"PBS_JOBID": "1"}, workdir)
    with pytest.raises(LaunchError, match="PBS_JOBID is not set"):
        plan("pbs", {k: v for k, v in pbs_env(workdir, ["a"]).items() if k != "PBS_JOBID"}, workdir)
    with pytest.raises(LaunchError, match="LAUNCHER=srun only works under Slurm"):
        plan("pbs", pbs_env(workdir, ["a"]), workdir, launcher="srun")
    with pytest.raises(LaunchError, match="is not KEY=VALUE"):
        plan("pbs", pbs_env(workdir, ["a"]), workdir, extra="train.epochs")
    with pytest.raises(LaunchError, match="train.epoch: unknown key"):
        plan("pbs", pbs_env(workdir, ["a"]), workdir, extra="train.epoch=3")
    with pytest.raises(LaunchError, match="missing.yaml"):
        plan("pbs", pbs_env(workdir, ["a"]), workdir, config="configs/missing.yaml")


def test_rerun_continues_an_unfinished_attempt_but_not_a_finished_run(workdir):
    run_dir = workdir / "runs" / "101.server"
    run_dir.mkdir(parents=True)
    (run_dir / "report.json").write_text(json.dumps({"status": "running"}))
    p = plan("pbs", pbs_env(workdir, ["a"]), workdir)
    assert p.rerun and "--overwrite" not in p.command  # train resumes it from its checkpoint
    (run_dir / "report.json").write_text(json.dumps({"status": "completed"}))
    with pytest.raises(LaunchError, match="already holds a completed run"):
        plan("pbs", pbs_env(workdir, ["a"]), workdir)


def slurm_env(**extra):
    return {"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_TASKS_PER_NODE": "2(x2)",
            "SLURM_NTASKS": "4", "SLURM_CPUS_PER_TASK": "12", "PATH": "/usr/bin:/bin", **extra}


# --- PBS Professional / OpenPBS and Torque: what the job asked for ------------------------------

OPENPBS_QSTAT = """Job Id: 4242.pbs-server
    Job_Name = fmnist-dist
    Job_Owner = me@login1
    job_state = R
    queue = workq
    Account_Name = climate
    exec_host = n1/0*8+n2/0*8
    exec_vnode = (n1:ncpus=8)+(n2:ncpus=8)
    Resource_List.filesystems = home:eagle
    Resource_List.mpiprocs = 4
    Resource_List.ncpus = 16
    Resource_List.nodect = 2
    Resource_List.place = scatter
    Resource_List.select = 2:ncpus=8:mpiprocs=2
    Resource_List.walltime = 00:30:00
    Submit_arguments = -A climate -q debug -l select=2:ncpus=8:mpiprocs=2 -l place=scatter -l filesyst
\tems=home:eagle -l walltime=00:30:00 jobs/train.pbs
    Variable_List = PBS_O_HOME=/home/me,PBS_O_LANG=C.UTF-8,PBS_O_LOGNAME=me,
\tPBS_O_QUEUE=debug,PBS_O_WORKDIR=/home/me/fmnist-dist
"""


def fake_pbs_bin(tmp_path, qstat_output: str, status: int = 0) -> str:
    """A directory holding a `qstat` that prints qstat_output (no PBS server can be installed here)."""
    bin_dir = tmp_path / "pbs-bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "answer").write_text(qstat_output)
    script = f'#!/bin/sh\n[ "$1" = -f ] || exit 2\ncat "$(dirname "$0")/answer" >&{2 if status else 1}\nexit {status}\n'
    (bin_dir / "qstat").write_text(script)
    (bin_dir / "qstat").chmod(0o755)
    return f"{bin_dir}:/usr/bin:/bin"


def test_qstat_full_output_is_read_with_its_continuation_lines():
    attributes = launch.parse_qstat_full(OPENPBS_QSTAT)
    assert attributes["Resource_List.select"] == "2:ncpus=8:mpiprocs=2"
    assert attributes["Submit_arguments"].endswith("-l filesystems=home:eagle -l walltime=00:30:00 jobs/train.pbs")
    assert attributes["Variable_List"].endswith("PBS_O_LOGNAME=me,PBS_O_QUEUE=debug,PBS_O_WORKDIR=/home/me/fmnist-dist")
    assert "Job Id: 4242.pbs-server" not in attributes and attributes["queue"] == "workq"


@pytest.mark.parametrize("text, seconds", [("01:00:00", 3600), ("00:30:00", 1800), ("90:00", 5400), ("3600", 3600),
                                           ("1:00:00:00", 86400), ("00:00:10.5", 10), ("1h", None), ("", None)])
def test_walltime_as_pbs_writes_it(text, seconds):
    assert launch.parse_walltime(text) == seconds


def test_openpbs_plan_reads_its_request_from_qstat(workdir, tmp_path):
    """PBS Pro: one node-file line per MPI process, NCPUS = the chunk's ncpus, no PBS_WALLTIME: the
    walltime, account, resources come from qstat -f; the queue is the one submitted to."""
    env = pbs_env(workdir, ["n1", "n1", "n2", "n2"], job_id="4242.pbs-server", NCPUS="8", OMP_NUM_THREADS="8",
                  PBS_O_QUEUE="debug", PATH=fake_pbs_bin(tmp_path, OPENPBS_QSTAT))
    p = plan("pbs", env, workdir, cores_per_node=None, extra="train.epochs=3 train.lr=0.002")
    assert (p.ranks, p.ranks_per_node, p.cores_per_node, p.threads_per_rank) == (4, 2, 8, 4)
    assert any("cores per node from exec_host = n1/0*8+n2/0*8" in n for n in p.notes)
    assert "--map-by" in p.command and "slot:PE=4" in p.command
    assert p.command[-2:] == ["--set", "train.time_limit=1680"]                 # 30 min - 120 s
    assert any("walltime 00:30:00 from qstat -f 4242.pbs-server" in n for n in p.notes)
    run_dir = workdir / "runs" / "4242.pbs-server"
    assert p.resubmit == ("qsub -A climate -q debug -l select=2:ncpus=8:mpiprocs=2 -l place=scatter "
                          "-l walltime=00:30:00 -l filesystems=home:eagle "
                          f'-v RUN_DIR={run_dir},EXTRA="train.epochs=3 train.lr=0.002" jobs/train.pbs')
    assert p.shield[1:] == ["-c", launch.SIGTERM_BLOCKED] and p.shield[0] == "/venv/bin/python"


def test_openpbs_ompthreads_sets_the_threads_per_rank(workdir, tmp_path):
    qstat = OPENPBS_QSTAT.replace("select = 2:ncpus=8:mpiprocs=2", "select = 2:ncpus=8:mpiprocs=2:ompthreads=3")
    env = pbs_env(workdir, ["n1", "n1", "n2", "n2"], NCPUS="3", OMP_NUM_THREADS="3",
                  PATH=fake_pbs_bin(tmp_path, qstat))
    p = plan("pbs", env, workdir, cores_per_node=None)
    assert (p.cores_per_node, p.threads_per_rank) == (6, 3)
    assert any("ompthreads=3" in n for n in p.notes)


def test_openpbs_chunks_sharing_a_node_add_up(workdir, tmp_path):
    """select=4:ncpus=1 packed onto one node: NCPUS is one chunk's (1), the node holds 4 of them."""
    qstat = OPENPBS_QSTAT.replace("select = 2:ncpus=8:mpiprocs=2", "select = 4:ncpus=1").replace(
        "exec_host = n1/0*8+n2/0*8", "exec_host = n1/0*1+n1/1*1+n1/2*1+n1/3*1")
    env = pbs_env(workdir, ["n1"] * 4, NCPUS="1", PATH=fake_pbs_bin(tmp_path, qstat))
    p = plan("pbs", env, workdir, cores_per_node=None)
    assert (p.ranks_per_node, p.cores_per_node, p.threads_per_rank, p.bind) == (4, 4, 1, True)
    env = pbs_env(workdir, ["n1"] * 4, NCPUS="1")                       # qstat does not answer: NCPUS
    p = plan("pbs", env, workdir, cores_per_node=None)
    assert (p.cores_per_node, p.bind) == (1, False) and any("cores per node from NCPUS=1" in n for n in p.notes)


def test_torque_plan_without_qstat_asks_again_from_its_variables(workdir):
    env = pbs_env(workdir, ["a", "a"], PBS_WALLTIME="3600", PBS_NUM_NODES="1", PBS_NUM_PPN="2", PBS_O_QUEUE="batch")
    p = plan("pbs", env, workdir, extra="train.epochs=1", np=1, launcher="horovodrun")
    assert p.command[-2:] == ["--set", "train.time_limit=3480"]
    assert any("walltime 01:00:00 from PBS_WALLTIME=3600" in n for n in p.notes)
    assert p.resubmit == (f"qsub -q batch -l nodes=1:ppn=2 -l walltime=01:00:00 -v RUN_DIR={workdir}/runs/101.server,"
                          f'EXTRA=train.epochs=1,NP=1,LAUNCHER=horovodrun jobs/train.pbs')
    assert p.shield == [] and any("horovodrun starts mpirun through /bin/sh" in n for n in p.notes)


def test_pbs_plan_when_qstat_does_not_answer(workdir, tmp_path):
    env = pbs_env(workdir, ["a"], PATH=fake_pbs_bin(tmp_path, "qstat: Unknown Job Id 101.server", status=1))
    p = plan("pbs", env, workdir)
    assert not any("time_limit" in a for a in p.command)
    assert any(n.startswith("no walltime known (qstat -f 101.server exited with status 1: qstat: Unknown Job Id "
                            "101.server): the training is not stopped before it") for n in p.notes)
    assert any(n.startswith("the job has one slot, so one rank: ask for more with qsub -l select=") for n in p.notes)
    assert p.resubmit == f"qsub -v RUN_DIR={workdir}/runs/101.server jobs/train.pbs"


def test_the_resubmission_passes_its_variables_through_the_shell_and_qsub(workdir):
    """What bash hands qsub from the printed command, and qsub -v's split at commas outside quotes,
    give back every value: spaces, quotes, $, and a comma."""
    env = pbs_env(workdir, ["a"], PBS_O_QUEUE="q", VENV="/opt/my env", FMNIST_MPI_ARGS="--mca btl ^openib,self")
    p = plan("pbs", env, workdir, extra='train.lr=1e-3 data.dir="/data/x $HOME"', run_dir="runs/it's here")
    shell = subprocess.run(["bash", "-c", 'eval "set -- $RESUBMIT"; printf "%s\\0" "$@"'],
                           env={"RESUBMIT": p.resubmit}, capture_output=True, text=True, check=True)
    argv = shell.stdout.split("\0")[:-1]
    assert argv[:3] == ["qsub", "-q", "q"] and argv[3] == "-v" and argv[-1] == "jobs/train.pbs"
    # qsub -v: comma-separated NAME=value, a value holding commas in quotes
    items = re.findall(r"(\w+)=('[^']*'|[^,]*)", argv[4])
    assert {k: v.strip("'") for k, v in items} == {
        "RUN_DIR": str(workdir / "runs" / "it's here"), "EXTRA": 'train.lr=1e-3 data.dir="/data/x $HOME"',
        "VENV": "/opt/my env", "FMNIST_MPI_ARGS": "--mca btl ^openib,self"}


def test_slurm_plan_srun_when_pmix(workdir):
    p = plan("slurm", slurm_env(), workdir, cores_per_node=None, srun_plugins=lambda: {"pmix", "pmi2"})
    assert (p.launcher, p.ranks, p.threads_per_rank, p.cores_per_node) == ("srun", 4, 12, 24)
    assert p.command[:5] == ["srun", "--mpi=pmix", "--ntasks=4", "--cpus-per-task=12", "--kill-on-bad-exit=1"]
    assert p.run_dir == str(workdir / "runs" / "77")


def test_slurm_plan_falls_back_to_mpirun(workdir):
    p = plan("slurm", slurm_env(), workdir, cores_per_node=None, srun_plugins=lambda: {"pmi2"})
    assert p.launcher == "mpirun" and p.hostfile is None    # Open MPI reads the Slurm allocation itself
    assert p.command[:7] == ["mpirun", "-np", "4", "--map-by", "slot:PE=12", "--bind-to", "core"]
    assert any("srun --mpi=pmix (what Open MPI needs) is not available" in n for n in p.notes)


def test_slurm_plan_np_smaller_than_tasks(workdir):
    p = plan("slurm", slurm_env(), workdir, np=2, srun_plugins=lambda: {"pmix"})
    assert p.placement == [("n1", 2)] and "--ntasks=2" in p.command


def test_mpi_list_parsing():
    slurm_22 = "MPI plugin types are...\n\tpmix\n\tnone\n\tcray_shasta\n\tpmi2\nspecific pmix plugin versions available: pmix_v4\n"
    assert launch.mpi_plugins(slurm_22) == {"pmix", "pmi2"}
    assert launch.mpi_plugins("MPI plugin types are...\n\tnone\n\tpmi2\n") == {"pmi2"}
    assert launch.mpi_plugins("MPI plugin types are...\n\tnone\n\tpmix_v3\n") == {"pmix"}
    assert launch.mpi_plugins("srun: MPI types are...\nsrun: none\nsrun: pmi2\n") == {"pmi2"}


# --- the launch line of each MPI (mpi.py decides the family; the run of each is tests/test_mpis.py)

def test_mpich_plan_is_hydra_with_a_machinefile_and_core_binding(workdir):
    p = plan("pbs", pbs_env(workdir, ["n1", "n1", "n2"]), workdir, mpi_family="mpich")
    assert p.command[:7] == ["mpirun", "-n", "3", "-machinefile", f"{p.run_dir}/hostfile", "-bind-to", "core:4"]
    assert "-x" not in p.command and "--mca" not in p.command     # Open MPI's options
    assert (Path(p.run_dir) / "hostfile").read_text() == "n1:2\nn2:1\n"
    assert "  mpi     MPICH" in launch.describe(p)


def test_intel_mpi_plan_pins_by_domain(workdir):
    p = plan("pbs", pbs_env(workdir, ["n1", "n1"]), workdir, mpi_family="intel")
    assert p.command[:7] == ["mpirun", "-n", "2", "-machinefile", f"{p.run_dir}/hostfile",
                             "-genv", "I_MPI_PIN_DOMAIN"] and p.command[7] == "4:compact"
    over = plan("pbs", pbs_env(workdir, ["n1"] * 4), workdir, mpi_family="intel", cores_per_node=2,
                run_dir="runs/over")
    assert over.command[5:8] == ["-genv", "I_MPI_PIN", "0"]          # oversubscribed: no pinning


@pytest.mark.parametrize("family, pmi", [("openmpi", "pmix"), ("mpich", "pmi2"), ("intel", "pmi2")])
def test_srun_speaks_the_pmi_of_the_mpi(workdir, family, pmi, monkeypatch):
    monkeypatch.setattr(launch, "slurm_pmi2_library", lambda: "/usr/lib/libpmi2.so.0")
    p = plan("slurm", slurm_env(), workdir, cores_per_node=None, srun_plugins=lambda: {"pmix", "pmi2"},
             mpi_family=family)
    assert p.launcher == "srun" and p.command[1] == f"--mpi={pmi}"
    assert ("--export=ALL,I_MPI_PMI_LIBRARY=/usr/lib/libpmi2.so.0" in p.command) == (family == "intel")
    without = plan("slurm", slurm_env(), workdir, cores_per_node=None, srun_plugins=lambda: {"pmix"},
                   mpi_family=family, run_dir="runs/other")
    assert without.launcher == ("srun" if pmi == "pmix" else "mpirun")


def test_shell_output_round_trips_through_bash(workdir):
    env = pbs_env(workdir, ["a", "b"], FMNIST_MPI_ARGS="--mca plm_rsh_args \"-F /x y/ssh config\"")
    p = plan("pbs", env, workdir, extra="train.lr=1e-3", run_dir="runs/it's here")
    script = 'eval "$PLAN"; printf "%s\\n" "$RUN_DIR"; printf "%s\\0" "${LAUNCH[@]}" - "${PREFLIGHT[@]}"'
    out = subprocess.run(["bash", "-c", script], env={"PLAN": launch.shell_assignments(p)},
                         capture_output=True, text=True, check=True).stdout
    run_dir, _, args = out.partition("\n")
    assert run_dir == str(workdir / "runs" / "it's here")
    assert args.split("\0")[:-1] == p.command + ["-"] + p.preflight
    assert "-F /x y/ssh config" in p.command


# --- checks and the CLI -----------------------------------------------------------------------

def test_check_python_missing_and_without_horovod(tmp_path):
    with pytest.raises(LaunchError, match="does not exist or is not executable"):
        launch.check_python(str(tmp_path / "bin" / "python"))
    bare = "/usr/bin/python3"      # the system Python: no Horovod there
    if os.path.exists(bare):
        with pytest.raises(LaunchError, match=r"cannot import horovod.tensorflow \(ModuleNotFoundError"):
            launch.check_python(bare)


def cli(*args, env=None, cwd=None):
    full_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "fmnist_dist", "launch-plan", *args], env=full_env,
                          cwd=cwd or ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("env, args, message", [
    ({"PBS_JOBID": "1"}, [], "fmnist-dist: error: PBS_NODEFILE is not set"),
    ({"PBS_JOBID": "1", "PBS_NODEFILE": "/nonexistent/nodes"}, [],
     "fmnist-dist: error: cannot read the node file PBS_NODEFILE=/nonexistent/nodes: No such file or directory"),
    ({"PBS_JOBID": "1", "PBS_NODEFILE": "{nodes}"}, ["--np", "3"],
     "fmnist-dist: error: NP=3 ranks requested but the job has only 2 slots"),
    ({"PBS_JOBID": "1", "PBS_NODEFILE": "{nodes}"}, ["--np", "two"],
     "fmnist-dist: error: NP='two': expected a whole number of ranks"),
    ({"PBS_JOBID": "1", "PBS_NODEFILE": "{nodes}"}, ["--python", "/nonexistent/python"],
     "fmnist-dist: error: the Python to launch, /nonexistent/python, does not exist"),
    ({}, ["--scheduler", "slurm"], "fmnist-dist: error: SLURM_JOB_NODELIST / SLURM_TASKS_PER_NODE are not set"),
])
def test_cli_failures_are_one_line(tmp_path, env, args, message):
    nodes = tmp_path / "nodes"
    nodes.write_text("vm\nvm\n")
    env = {k: v.replace("{nodes}", str(nodes)) for k, v in env.items()}
    scheduler = [] if "--scheduler" in args else ["--scheduler", "pbs"]
    proc = cli(*scheduler, *args, "--workdir", str(tmp_path), "--config", str(ROOT / "configs" / "default.yaml"),
               env=env)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(message), proc.stderr


def test_cli_shell_format(tmp_path):
    nodes = tmp_path / "nodes"
    nodes.write_text("vm\nvm\n")
    proc = cli("--scheduler", "pbs", "--format", "shell", "--workdir", str(tmp_path), "--no-check",
               "--config", str(ROOT / "configs" / "default.yaml"), "--extra", "train.epochs=1",
               env={"PBS_JOBID": "9.srv", "PBS_NODEFILE": str(nodes)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"RUN_DIR={tmp_path}/runs/9.srv\nPREFLIGHT=(mpirun -np 2 --hostfile ")
    assert "\nLAUNCH=(mpirun -np 2 --hostfile " in proc.stdout
    assert "\nSHIELD=(" in proc.stdout and "\nRESUBMIT='qsub -v RUN_DIR=" in proc.stdout
    assert "fmnist-dist launch-plan: pbs job 9.srv: slots vm:2" in proc.stderr
    proc = cli("--scheduler", "pbs", "--format", "json", "--workdir", str(tmp_path), "--no-check",
               "--config", str(ROOT / "configs" / "default.yaml"), "--run-dir", "elsewhere",
               env={"PBS_JOBID": "9.srv", "PBS_NODEFILE": str(nodes)})
    assert json.loads(proc.stdout)["run_dir"] == str(tmp_path / "elsewhere")


@pytest.mark.parametrize("banner, family", [
    ("mpirun (Open MPI) 4.1.4\n\nReport bugs to http://www.open-mpi.org/community/help/", "openmpi"),
    ("Intel(R) MPI Library for Linux* OS, Version 2021.19.0 Build 20260929 (id: 1821d9b)", "intel"),
    ("HYDRA build details:\n    Version:                                 4.0.2\n", "mpich"),
    ("something else 1.0", None)])
def test_a_launcher_is_known_by_its_version(tmp_path, banner, family):
    fake = tmp_path / "mpirun"       # a real executable that answers like that MPI's mpirun
    fake.write_text(f"#!/bin/sh\nprintf '%s\\n' '{banner}'\n")
    fake.chmod(0o755)
    found = mpi.launcher(str(fake))
    assert found.family == family
    built = mpi.Mpi("openmpi", "Open MPI v4.1.4", "/usr/lib/libmpi.so.40")
    if family in ("intel", "mpich"):
        with pytest.raises(LaunchError, match=rf"^Horovod was built against Open MPI \(Open MPI v4.1.4; "
                                              rf"/usr/lib/libmpi.so.40\), but the launcher is {mpi.NAMES[family]} "):
            mpi.check_match(built, found)
    else:
        mpi.check_match(built, found)   # the same MPI, or one not recognised: no objection


def test_a_rank_knows_its_launcher_before_mpi_starts():
    hydra, ompi = {"PMI_RANK": "0", "PMI_SIZE": "2"}, {"OMPI_COMM_WORLD_SIZE": "2"}
    assert mpi.launched_by(hydra) == "hydra" and mpi.launched_by(ompi) == "openmpi"
    assert mpi.launched_by({**hydra, "SLURM_STEP_ID": "0"}) is None      # srun's PMI-2
    intel = mpi.Mpi("intel", "Intel(R) MPI Library 2021.19", "/x/libmpi.so.12")
    mpi.check_rank(intel, hydra)
    with pytest.raises(LaunchError, match=r"started by Open MPI's mpirun, but Horovod was built against Intel MPI"):
        mpi.check_rank(intel, ompi)


def test_threads_follow_slurm_cpus_per_task_inside_a_step():
    # a job confined by cgroups to 4 cores, 2 tasks with --cpus-per-task=2, not bound per task
    assert environment.threads_for_rank(0, 4, 8, 2, environment.slurm_cpus_per_task(
        {"SLURM_STEP_ID": "0", "SLURM_CPUS_PER_TASK": "2"})) == 2
    assert environment.slurm_cpus_per_task({"SLURM_CPUS_PER_TASK": "2"}) is None  # batch script, not a task
    assert environment.threads_for_rank(3, 4, 8, 2, 2) == 3                        # the config wins


@pytest.mark.parametrize("threads, towers, intra, inter, layout", [
    (2, 2, 0, 0, (1, 2)),        # one process, 2 simulated ranks: side by side, one thread each
    (2, 4, 0, 0, (1, 2)),        # more towers than threads: as many at a time as there are threads
    (4, 2, 0, 0, (2, 2)),
    (3, 2, 0, 0, (1, 2)),        # threads that do not divide: never more threads than cores
    (2, 1, 0, 0, (2, 1)),        # one rank's batch: both threads inside each op
    (1, 2, 0, 0, (1, 1)),        # one thread: nothing to run side by side
    (2, 2, 2, 0, (2, 1)),        # an explicit intra-op count is kept as asked
    (2, 2, 0, 3, (2, 3)),        # so is an explicit inter-op count
])
def test_thread_layout_runs_a_process_s_simulated_ranks_side_by_side(threads, towers, intra, inter, layout):
    assert environment.thread_layout(threads, towers, intra, inter) == layout


@pytest.mark.parametrize("environ, size, nodes", [
    ({}, 1, 1),
    ({"HOROVOD_SIZE": "4", "HOROVOD_LOCAL_SIZE": "2", "HOROVOD_CROSS_SIZE": "2"}, 4, 2),
    ({"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, 8, 4),
    ({"PMI_SIZE": "6", "MPI_LOCALNRANKS": "3"}, 6, 2),
    ({"SLURM_STEP_ID": "0", "SLURM_NTASKS": "4", "SLURM_TASKS_PER_NODE": "2(x2)"}, 4, 2),
    ({"SLURM_NTASKS": "4"}, 1, 1),                  # the batch script, not a task of a step
])
def test_a_process_knows_the_job_s_size_before_horovod_starts(environ, size, nodes):
    assert (environment.launcher_size(environ), environment.launcher_nodes(environ)) == (size, nodes)


def test_a_process_knows_how_long_it_has_run():
    """environment.seconds_since_process_start: the process's start (lease.process_start, from
    /proc/PID/stat) against the uptime, in a fresh process that slept 0.3 s first."""
    code = ("import time\ntime.sleep(0.3)\nfrom fmnist_dist import environment\n"
            "print(environment.seconds_since_process_start(time.perf_counter()))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) >= 0.25


def test_a_timeline_is_asked_for_only_when_the_config_wants_one_and_the_launcher_set_none():
    wants = SimpleNamespace(report=SimpleNamespace(timeline=True))
    environ: dict[str, str] = {}
    environment.request_timeline(wants, environ)
    assert environ == {"HOROVOD_TIMELINE": "DYNAMIC"}
    environ = {"HOROVOD_TIMELINE": "/tmp/whole-run.json"}
    environment.request_timeline(wants, environ)
    assert environ == {"HOROVOD_TIMELINE": "/tmp/whole-run.json"}
    environ = {}
    environment.request_timeline(SimpleNamespace(report=SimpleNamespace(timeline=False)), environ)
    assert environ == {}
