"""Every MPI a Xeon cluster runs, for real: Open MPI (Debian), MPICH (Debian) and Intel MPI (PyPI).

`scripts/setup.sh test` builds Horovod against each: the venv's own against MPI= (default Open
MPI), the others alone in .venv/mpi/NAME/site, each with an env.sh that puts its MPI first on PATH
and LD_LIBRARY_PATH, as `module load` would on a cluster. Each test takes one MPI's environment and
runs what a user runs: jobs/train.pbs as PBS runs it (launch-plan writes that MPI's mpirun line), a
Slurm job through srun, a job on two network-namespace nodes, and a launcher of the wrong MPI, which
must fail in one line. In CI nothing here may skip."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from conftest import ROOT, ROOT_MPI_ENV, SHORT_CONFIG, SHORT_EXTRA, VENV, last_line, need, short_host, \
    unavailable, wait_for
from nodes import NODES, in_node, two_nodes
from pbs import JOB_PATH
from test_jobs import RUN_TIMEOUT, check_report, read_report, run_pbs_job
from test_jobs import slurm  # noqa: F401  (the module's one-node Slurm cluster)

from fmnist_dist.bench.variants import sourced_env
from fmnist_dist.mpi import NAMES

MPIS = tuple(NAMES)
# The first words of each MPI's launch line, as launch-plan writes it for a PBS job on one node.
LAUNCH_LINE = {"openmpi": "mpirun -np 2 --hostfile ", "mpich": "mpirun -n 2 -machinefile ",
               "intel": "mpirun -n 2 -machinefile "}


def built_with() -> str:
    marker = VENV / "mpi" / "built-with"
    return marker.read_text().strip() if marker.exists() else "openmpi"


def mpi_env(name: str, path: str = JOB_PATH) -> dict[str, str]:
    """What .venv/mpi/NAME/env.sh sets on top of `path`: that MPI first, and (for an MPI other than
    the venv's own) the Horovod built against it first on PYTHONPATH."""
    if name != built_with() and not (VENV / "mpi" / name / "site" / ".built").exists():
        unavailable(f"no Horovod built against {NAMES[name]} in {VENV}/mpi/{name} (run: bash scripts/setup.sh test)")
    env_sh = VENV / "mpi" / name / "env.sh"
    if not env_sh.exists():
        return {"PATH": path}
    return sourced_env(str(env_sh), path)


@pytest.mark.slow
@pytest.mark.parametrize("name", MPIS)
def test_a_pbs_job_under_each_mpi(tmp_path, name):
    """jobs/train.pbs with that MPI's environment: launch-plan recognises the MPI Horovod was built
    against and writes its mpirun line; the preflight and a short 2-rank training run under it."""
    need("bash", root=False)
    host = short_host()
    rc, log, run_dir, seconds = run_pbs_job(tmp_path, [host, host], CONFIG=SHORT_CONFIG, EXTRA=SHORT_EXTRA,
                                            LAUNCHER="mpirun", **mpi_env(name))
    print(f"PBS job under {NAMES[name]}: {seconds:.0f} s")
    assert rc == 0, log[-4000:]
    assert f"  mpi     {NAMES[name]}\n" in log, log[:3000]
    assert f"launch  {LAUNCH_LINE[name]}" in log, log[:3000]
    assert last_line(log) == f"fmnist-dist: done: report in {run_dir}/report.md"
    check_report(read_report(run_dir, log), log, {host: [0, 1]})
    shutil.rmtree(run_dir)


def other_mpi() -> str:
    return "mpich" if built_with() != "mpich" else "intel"


@pytest.mark.slow
def test_a_launcher_of_another_mpi_fails_in_one_line(tmp_path):
    """Horovod built against MPICH (or Intel MPI), started by Open MPI's mpirun (and the reverse):
    the ranks would each come up alone. launch-plan refuses before anything starts, and the preflight
    in the ranks says it in one line."""
    wrong = other_mpi()
    env = {**os.environ, **ROOT_MPI_ENV, "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": mpi_env(wrong).get("PYTHONPATH", "") + os.pathsep + str(ROOT)}
    env.pop("I_MPI_ROOT", None)
    nodes = tmp_path / "nodes"
    nodes.write_text(f"{short_host()}\n" * 2)
    python = str(VENV / "bin" / "python")
    plan = subprocess.run([python, "-m", "fmnist_dist", "launch-plan", "--scheduler", "pbs", "--workdir", str(tmp_path),
                           "--config", str(ROOT / SHORT_CONFIG), "--python", python],
                          env={**env, "PBS_JOBID": "1.srv", "PBS_NODEFILE": str(nodes), "PBS_WALLTIME": "3600"},
                          capture_output=True, text=True, timeout=300)
    assert plan.returncode == 2, plan.stdout + plan.stderr
    assert len(plan.stderr.strip().splitlines()) == 1, plan.stderr
    assert re.match(rf"fmnist-dist: error: Horovod was built against {NAMES[wrong]} \(.*\), but the launcher is "
                    r"Open MPI \(mpirun \(Open MPI\)", plan.stderr), plan.stderr
    ompi_mpirun = shutil.which("mpirun.openmpi") or "mpirun"
    pre = subprocess.run([ompi_mpirun, "-np", "2", "--oversubscribe", python, "-m", "fmnist_dist", "preflight",
                          "--config", str(ROOT / SHORT_CONFIG)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    ours = [line for line in pre.stderr.splitlines() if line.startswith("fmnist-dist:")]
    assert pre.returncode != 0 and len(ours) == 1, pre.stdout + pre.stderr
    assert ours[0].startswith(f"fmnist-dist: error: this rank was started by Open MPI's mpirun, but Horovod was "
                              f"built against {NAMES[wrong]}"), ours


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mpich", "intel"])
def test_a_slurm_job_through_srun_pmi2(slurm, tmp_path, name):
    """sbatch jobs/train.slurm with MPICH's or Intel MPI's environment: srun starts the ranks through
    PMI-2 (the PMI those MPIs speak; Intel MPI loads Slurm's libpmi2)."""
    (ROOT / "runs").mkdir(exist_ok=True)
    env = {"HOME": str(tmp_path), "LANG": "C.UTF-8", "SLURM_CONF": str(slurm.conf), "CONFIG": SHORT_CONFIG,
           "EXTRA": SHORT_EXTRA, **ROOT_MPI_ENV, **mpi_env(name, os.environ.get("PATH") or JOB_PATH)}
    before = slurm.newest_job(all_states=True)
    sbatch = subprocess.Popen(["sbatch", "--wait", str(ROOT / "jobs" / "train.slurm")], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        job_id = wait_for(lambda: (j := slurm.newest_job(all_states=True)) != before and j, 60, "the job")
        stdout, stderr = sbatch.communicate(timeout=RUN_TIMEOUT)
    finally:
        if sbatch.poll() is None:
            sbatch.kill()
    log_path = ROOT / "runs" / f"slurm-{job_id}.out"
    log = log_path.read_text() if log_path.exists() else f"(no {log_path})\n{slurm.logs()}"
    assert sbatch.returncode == 0, f"sbatch --wait -> {sbatch.returncode}: {stderr}\n{log[-4000:]}"
    assert "launch  srun --mpi=pmi2 --ntasks=2" in log, log[:3000]
    assert f"  mpi     {NAMES[name]}\n" in log
    run_dir = ROOT / "runs" / job_id
    check_report(read_report(run_dir, log), log, {slurm.node: [0, 1]})
    shutil.rmtree(run_dir)
    log_path.unlink()


@pytest.mark.slow
def test_a_pbs_job_on_two_nodes_under_intel_mpi(tmp_path):
    """Intel MPI's Hydra starts its proxy on the second namespace node over ssh; the ranks talk TCP
    over the veth pair (libfabric's tcp provider)."""
    need("ip", "unshare", "sshd", "ssh", "ssh-keygen")
    env = mpi_env("intel")
    with two_nodes(tmp_path / "nodes") as nodes:
        hosts = [name for name, *_ in NODES]
        rc, log, run_dir, seconds = run_pbs_job(
            tmp_path, hosts, wrap=lambda cmd: in_node(NODES[0], cmd), CONFIG=SHORT_CONFIG, EXTRA=SHORT_EXTRA,
            LAUNCHER="mpirun", FI_PROVIDER="tcp", I_MPI_HYDRA_BOOTSTRAP="ssh",
            FMNIST_MPI_ARGS=f"-bootstrap-exec-args '-F {nodes.ssh_config}'", **env)
    print(f"PBS job on two nodes under Intel MPI: {seconds:.0f} s")
    assert rc == 0, log[-4000:]
    assert "  mpi     Intel MPI\n" in log and "launch  mpirun -n 2 -machinefile " in log, log[:3000]
    report = read_report(run_dir, log)
    check_report(report, log, {"fmnode1": [0], "fmnode2": [1]})
    shutil.rmtree(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mpich", "intel"])
def test_ranks_take_sigterm_though_hydra_passes_on_the_blocked_mask(name):
    """Under PBS launch-plan starts mpirun with SIGTERM blocked (PBS signals the whole session and the
    launcher must outlive the ranks' checkpoint). Open MPI's and Intel MPI's launchers unblock it in
    the ranks; MPICH's Hydra passes the mask on, so the training's stop flag unblocks it itself, or a
    qdel would never reach the ranks."""
    from fmnist_dist.launch import SIGTERM_BLOCKED
    code = ("import signal; before = signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, []); "
            "from fmnist_dist.training.callbacks import StopFlag; StopFlag.install(); "
            "after = signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, []); print('blocked', before, after)")
    python = str(VENV / "bin" / "python")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **mpi_env(name, os.environ["PATH"])}
    env["PYTHONPATH"] = env.get("PYTHONPATH", "") + os.pathsep + str(ROOT)
    proc = subprocess.run([python, "-c", SIGTERM_BLOCKED, "mpirun", "-n", "1", python, "-c", code], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    inherited = {"mpich": True, "intel": False}[name]
    assert f"blocked {inherited} False" in proc.stdout, proc.stdout + proc.stderr
