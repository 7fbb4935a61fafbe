"""The job scripts with real components: the #PBS/#SBATCH headers, bash -n and shellcheck,
jobs/train.pbs run the way PBS runs it (Torque's environment on one node, then two network-namespace
nodes over ssh; PBS Professional / OpenPBS's qsub dialect, environment, qstat, qrerun and signals),
and jobs/train.slurm submitted with sbatch to a one-node Slurm cluster started for the test.

The real runs train 1 epoch of 100 steps on 2 ranks. In CI (CI=true) nothing here may skip."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (ROOT, ROOT_MPI_ENV, SHORT_CONFIG, SHORT_EXTRA, last_line, need, short_host, unavailable,
                      wait_for)
from nodes import NODES, in_node, two_nodes
from pbs import (KILL_DELAY, OpenPBS, pbs_job_env, session_processes, signal_processes, unique_job_id,
                 write_nodefile)
from slurm import slurm_cluster

PBS_SCRIPT = ROOT / "jobs" / "train.pbs"
SLURM_SCRIPT = ROOT / "jobs" / "train.slurm"
RUN_TIMEOUT = 1200          # one short training on a busy 2-core machine, generously bounded
LOOPBACK_MPI = {"OMPI_MCA_btl_tcp_if_include": "lo", "OMPI_MCA_oob_tcp_if_include": "lo"}


def directives(path: Path, prefix: str) -> list[str]:
    """The scheduler directives as the scheduler reads them: `#PBS`/`#SBATCH` lines before the
    first command (both qsub and sbatch stop at the first non-comment line)."""
    found = []
    for line in path.read_text().splitlines()[1:]:
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            break
        if stripped.startswith(prefix + " "):
            found.append(stripped[len(prefix):].strip())
    return found


def pbs_options(path: Path) -> dict[str, list[str]]:
    options: dict[str, list[str]] = {}
    for d in directives(path, "#PBS"):
        flag, _, value = d.partition(" ")
        options.setdefault(flag, []).append(value.strip())
    return options


def test_pbs_header_says_what_we_intend():
    opts = pbs_options(PBS_SCRIPT)
    assert opts["-N"] == ["fmnist-dist"]
    resources = dict(v.split("=", 1) for v in opts["-l"])
    # Only the walltime: nodes, select or ncpus here would clash with the other dialect's request on
    # the command line (PBS Pro: "qsub: Cannot be used with select or place: nodes").
    assert set(resources) == {"walltime"}
    assert re.fullmatch(r"\d+:\d\d:\d\d", resources["walltime"])
    assert opts["-j"] == ["oe"] and opts["-r"] == ["y"]
    text = PBS_SCRIPT.read_text()
    assert "qsub -l select=2:ncpus=2:mpiprocs=2 jobs/train.pbs" in text    # both dialects, as examples
    assert "qsub -l nodes=2:ppn=2 jobs/train.pbs" in text
    assert "nodes=2:xeon:ppn=2" in text                                   # DevCloud's property ...
    assert not any("xeon" in d for d in directives(PBS_SCRIPT, "#PBS"))  # ... only as a comment


def test_slurm_header_says_what_we_intend():
    opts = dict(d.partition("=")[::2] for d in directives(SLURM_SCRIPT, "#SBATCH"))
    for key in ("--nodes", "--ntasks-per-node", "--cpus-per-task", "--time", "--requeue", "--signal", "--output"):
        assert key in opts, key
    assert opts["--signal"] == "B:USR1@120"
    assert opts["--output"].startswith("runs/")
    assert int(opts["--ntasks-per-node"]) * int(opts["--cpus-per-task"]) <= 2   # fits the test node


@pytest.mark.parametrize("script", [PBS_SCRIPT, SLURM_SCRIPT], ids=["pbs", "slurm"])
def test_job_script_passes_bash_n_and_shellcheck(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    if not shutil.which("shellcheck"):
        unavailable("shellcheck is not installed (bash scripts/setup.sh test installs it)")
    # -x from the project directory: the scripts source jobs/common.sh, which is checked with them
    proc = subprocess.run(["shellcheck", "-x", "--shell=bash", str(script)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout


# ---------------------------------------------------------------------------------------------
# PBS, as PBS runs a job: a spooled copy of the script, a clean environment, cwd = $HOME


def run_pbs_job(tmp_path: Path, hosts: list[str], wrap=lambda cmd: cmd, timeout=RUN_TIMEOUT, **variables):
    job_id = unique_job_id()
    spool = tmp_path / "spool"
    home = tmp_path / "home"
    spool.mkdir(exist_ok=True)
    home.mkdir(exist_ok=True)
    script = spool / f"{job_id}.SC"                       # Torque runs a copy from mom_priv/jobs
    shutil.copy(PBS_SCRIPT, script)
    nodefile = write_nodefile(tmp_path / f"aux-{job_id}", hosts)
    env = pbs_job_env(ROOT, job_id, nodefile, hosts, HOME=str(home), **variables)
    cmd = wrap(["env", "-i", *(f"{k}={v}" for k, v in env.items()), "bash", str(script)])
    t = time.monotonic()
    proc = subprocess.run(cmd, cwd=home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    log = proc.stdout                                        # -j oe: one log
    (tmp_path / f"fmnist-dist.o{job_id.split('.')[0]}").write_text(log)
    return proc.returncode, log, ROOT / "runs" / job_id, time.monotonic() - t


def read_report(run_dir: Path, log: str) -> dict:
    path = run_dir / "report.json"
    assert path.exists(), f"no report in {run_dir}; job log ends:\n{log[-4000:]}"
    return json.loads(path.read_text())


def planned_threads(log: str) -> int:
    m = re.search(r"up to \d+ per node, (\d+) thread\(s\) each", log)
    assert m, log[-3000:]
    return int(m.group(1))


def check_report(report: dict, log: str, hosts: dict[str, list[int]]):
    assert report["status"] == "completed", log[-4000:]
    assert report["world"]["size"] == sum(len(r) for r in hosts.values())
    assert report["world"]["hosts"] == hosts
    assert [r["host"] for r in report["world"]["ranks"]] == [h for h, rs in hosts.items() for _ in rs]
    # Threads: what launch-plan announced is what every rank used.
    assert {r["threads"] for r in report["world"]["ranks"]} == {planned_threads(log)}
    per_host = report["timing"]["per_host"]                 # which node was slow
    assert {h: v["ranks"] for h, v in per_host.items()} == hosts
    assert all(v["images_per_s"] > 0 for v in per_host.values())
    assert report["results"]["test_accuracy"] > 0.6     # chance is 0.1; 100 steps reach ~0.8
    # The preflight ran first, through the same launcher: one answer per rank, from the ranks' hosts.
    assert "preflight: ok" in log and log.index("preflight: ok") < log.index("epoch 1/"), log[:3000]
    preflight = report["preflight"]
    assert [r["host"] for r in preflight["ranks"]] == [r["host"] for r in report["world"]["ranks"]]
    assert preflight["problems"] == [] and all(r["data"]["ok"] for r in preflight["ranks"])


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun"])
def test_pbs_job_as_pbs_runs_it(tmp_path, launcher):
    need("mpirun", root=False)
    host = short_host()
    rc, log, run_dir, seconds = run_pbs_job(tmp_path, [host, host], CONFIG=SHORT_CONFIG, EXTRA=SHORT_EXTRA,
                                            LAUNCHER=launcher, **LOOPBACK_MPI)
    print(f"PBS job on one node ({launcher}): {seconds:.0f} s")
    assert rc == 0, log[-4000:]
    assert last_line(log) == f"fmnist-dist: done: report in {run_dir}/report.md"
    expected = {"mpirun": "--hostfile", "horovodrun": f"-H {host}:2"}[launcher]
    assert re.search(rf"launch  {launcher} -np 2 {expected}", log), log[:3000]
    check_report(read_report(run_dir, log), log, {host: [0, 1]})
    if launcher == "mpirun":
        assert (run_dir / "hostfile").read_text() == f"{host} slots=2\n"
    shutil.rmtree(run_dir)


def failing(log: str, rc: int, message: str):
    assert rc != 0, log
    assert last_line(log).startswith(f"fmnist-dist: error: {message}"), log[-3000:]


@pytest.mark.parametrize("variables, hosts, message", [
    ({"VENV": "/nonexistent/venv"}, 2, "no Python environment: /nonexistent/venv/bin/activate not found"),
    ({"PBS_NODEFILE": "/nonexistent/nodes"}, 2, "cannot read the node file PBS_NODEFILE=/nonexistent/nodes"),
    ({"NP": "3"}, 2, "NP=3 ranks requested but the job has only 2 slots"),
    ({"PBS_O_WORKDIR": ""}, 2, "PBS_O_WORKDIR is not set"),
    ({"CONFIG": "configs/nope.yaml"}, 2, f"{ROOT}/configs/nope.yaml: config file not found"),
    ({"FMNIST_MPI_ARGS": "--no-such-option"}, 2, "preflight failed (see the lines above): the training was not launched"),
], ids=["no-env", "no-nodefile", "too-many-ranks", "no-workdir", "bad-config", "mpirun-fails"])
def test_pbs_job_fails_in_one_line(tmp_path, variables, hosts, message):
    need("mpirun", root=False)
    rc, log, run_dir, _ = run_pbs_job(tmp_path, [short_host()] * hosts, timeout=300, **variables)
    failing(log, rc, message)
    assert not (run_dir / "report.json").exists()
    shutil.rmtree(run_dir, ignore_errors=True)


@pytest.mark.slow
def test_pbs_job_failing_launch(tmp_path):
    """No data on the nodes: the preflight names the node and the reason, and nothing is launched."""
    need("mpirun", root=False)
    empty = tmp_path / "no-data"
    empty.mkdir()
    rc, log, run_dir, seconds = run_pbs_job(tmp_path, [short_host()] * 2, EXTRA=f"data.dir={empty}",
                                            **LOOPBACK_MPI)
    print(f"failing PBS job: {seconds:.0f} s")
    failing(log, rc, "preflight failed (see the lines above): the training was not launched")
    host = short_host()
    assert f"fmnist-dist: error: preflight: {host} (rank 0): Fashion-MNIST not found in {empty}" in log, log[-3000:]
    assert f"fmnist-dist: error: preflight: {host} (rank 1): Fashion-MNIST not found in {empty}" in log
    assert "epoch 1/" not in log and not (run_dir / "report.json").exists()
    shutil.rmtree(run_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# PBS Professional / OpenPBS: its qsub dialect, its mom's environment, qstat, qrerun and signals


@pytest.fixture
def openpbs(tmp_path) -> OpenPBS:
    need("mpirun", root=False)
    return OpenPBS(tmp_path / "openpbs", short_host(), ROOT, node_env=LOOPBACK_MPI)


def newest_verified_checkpoint(run_dir: Path) -> dict:
    """The newest checkpoint's state, verified file by file (SHA-256), and no half-written one left."""
    from fmnist_dist.training import checkpoint      # TensorFlow: loaded only by the tests that need it

    found = checkpoint.list_checkpoints(str(run_dir))
    assert found, f"no checkpoint in {run_dir}"
    left = sorted(p.name for p in (run_dir / "checkpoints").glob(".tmp-*"))
    assert not left, f"half-written checkpoints left: {left}"
    return checkpoint.verify(found[-1])


def stopped_by_qdel(openpbs: OpenPBS, job, log: Path) -> tuple[int, float, bool]:
    """Run the job until its first checkpoint, then signal it as OpenPBS's qdel, walltime and
    preemption do. The ranks are held (SIGSTOP) while the SIGTERM goes out, so that it lands
    mid-training however slow this machine is. (exit status, seconds to the end, SIGKILL needed)."""
    proc = openpbs.start(job, log)
    try:
        wait_for(lambda: proc.poll() is None and list((job.run_dir / "checkpoints").glob("examples-*")),
                 RUN_TIMEOUT, f"the first checkpoint of job {job.job_id}\n{log.read_text()[-3000:]}")
        ranks = [pid for pid in session_processes(proc.pid)
                 if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1:4] == [b"-m", b"fmnist_dist", b"train"]]
        assert len(ranks) == 2, ranks
        signal_processes(ranks, signal.SIGSTOP)
        seconds, killed = openpbs.kill(proc.pid, frozen=ranks)
        return proc.wait(30), seconds, killed
    finally:
        signal_processes(session_processes(proc.pid), signal.SIGKILL)


@pytest.mark.slow
def test_openpbs_job_stopped_by_qdel_checkpoints_and_its_resubmission_resumes(openpbs, tmp_path):
    """PBS Pro's dialect: -l select, the node file with one line per MPI process, NCPUS, the walltime
    only in qstat -f. qdel: SIGTERM to every process of the job at once, SIGKILL 10 s later. The
    ranks checkpoint within the 10 s and the report says "preempted"; the job prints the qsub command,
    with the job's request, that continues the run; that command, submitted, resumes and completes it."""
    host, extra = short_host(), f"{SHORT_EXTRA} checkpoint.every_steps=20"
    job = openpbs.qsub(["qsub", "-l", "select=1:ncpus=2:mpiprocs=2", "-v", f"CONFIG={SHORT_CONFIG},EXTRA={extra}",
                        "jobs/train.pbs"])
    assert "PBS_WALLTIME" not in job.env and job.env["NCPUS"] == "2"
    assert Path(job.env["PBS_NODEFILE"]).read_text() == f"{host}\n{host}\n"     # one line per mpiproc
    log = tmp_path / f"fmnist-dist.o{job.job_id.split('.')[0]}"
    resubmit = (f"qsub -q workq -l select=1:ncpus=2:mpiprocs=2 -l place=free -l walltime=01:00:00 -v RUN_DIR="
                f"{job.run_dir},CONFIG={SHORT_CONFIG},EXTRA=\"{extra}\" jobs/train.pbs")
    try:
        rc, seconds, killed = stopped_by_qdel(openpbs, job, log)
        text = log.read_text()
        print(f"OpenPBS job ended {seconds:.1f} s after SIGTERM (kill_delay {KILL_DELAY} s, SIGKILL needed: {killed})")
        assert "up to 2 per node, 1 thread(s) each (2 cores per node)" in text                # ncpus / mpiprocs
        assert "--set train.time_limit=3480" in text.split("  launch  ", 1)[1].splitlines()[0]  # 01:00:00 from qstat
        # Before the SIGKILL: the stop checkpoint, complete, and the report (mpirun did not end the ranks first).
        report = read_report(job.run_dir, text)
        assert report["status"] == "preempted" and "stop signal" in report["stopped"], text[-4000:]
        newest_verified_checkpoint(job.run_dir)
        assert "launch failed" not in text and "stopped by SIGTERM" not in text, text[-4000:]
        assert f"note: if this job ends early, continue with: {resubmit}" in text      # said at the start
        if not killed:      # the ranks' exit (TensorFlow's teardown) may outlast kill_delay on a busy machine
            assert rc == 75, text[-4000:]
            assert last_line(text) == f"fmnist-dist: preempted: checkpoint in {job.run_dir}; continue with: {resubmit}"

        again = openpbs.qsub(shlex.split(resubmit))
        assert again.run_dir == job.run_dir and again.job_id != job.job_id
        proc = openpbs.start(again, tmp_path / "again.log")
        assert proc.wait(RUN_TIMEOUT) == 0, (tmp_path / "again.log").read_text()[-4000:]
        text = (tmp_path / "again.log").read_text()
        assert last_line(text) == f"fmnist-dist: done: report in {job.run_dir}/report.md"
        assert f"resuming from {job.run_dir}/checkpoints/examples-" in text
        report = read_report(job.run_dir, text)
        check_report(report, text, {host: [0, 1]})
        assert [s["end"] for s in report["segments"]] == ["preempted", "completed"]
    finally:
        shutil.rmtree(job.run_dir, ignore_errors=True)


@pytest.mark.slow
def test_openpbs_job_at_its_time_limit_when_qrerun_is_refused(openpbs, tmp_path):
    """A plain qsub (the queue's default: one CPU) with a site's -A and -l filesystems: one rank. At
    train.time_limit the run stops cleanly (exit 75); qrerun is refused to ordinary users, so the job
    says so and prints the qsub command that continues with the same request."""
    extra = f"{SHORT_EXTRA} train.time_limit=1"
    job = openpbs.qsub(["qsub", "-A", "fmnist", "-l", "filesystems=home", "-v",
                        f"CONFIG={SHORT_CONFIG},EXTRA={extra}", "jobs/train.pbs"])
    log = tmp_path / "job.log"
    try:
        proc = openpbs.start(job, log)
        rc = proc.wait(RUN_TIMEOUT)
        text = log.read_text()
        assert rc == 75, text[-4000:]
        assert "note: the job has one slot, so one rank: ask for more with qsub -l select=" in text
        assert "time limit of 1 s reached" in read_report(job.run_dir, text)["stopped"]
        newest_verified_checkpoint(job.run_dir)
        assert (f"fmnist-dist: warning: qrerun {job.job_id} was refused (qrerun: Unauthorized Request  "
                f"{job.job_id}): on this server only operators and managers may rerun jobs") in text
        assert last_line(text) == (f"fmnist-dist: preempted: checkpoint in {job.run_dir}; continue with: qsub "
                                   f"-A fmnist -q workq -l select=1:ncpus=1 -l place=free -l walltime=01:00:00 "
                                   f"-l filesystems=home -v RUN_DIR={job.run_dir},CONFIG={SHORT_CONFIG},"
                                   f"EXTRA=\"{extra}\" jobs/train.pbs")
    finally:
        shutil.rmtree(job.run_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Slurm: sbatch --wait on a one-node cluster of real daemons


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    need("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "srun")
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


@pytest.mark.slow
@pytest.mark.parametrize("launcher, expected", [
    ("auto", "srun --mpi=pmix --ntasks=2 --cpus-per-task=1"),    # PMIx works with Debian's Open MPI
    ("mpirun", "mpirun -np 2 --map-by slot:PE=1 --bind-to core"),  # the fallback inside the allocation
], ids=["srun-pmix", "mpirun"])
def test_slurm_job_on_a_real_cluster(slurm, tmp_path, launcher, expected):
    (ROOT / "runs").mkdir(exist_ok=True)                      # sbatch --output=runs/... needs it
    env = {"PATH": os.environ.get("PATH") or "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8",
           "SLURM_CONF": str(slurm.conf), "CONFIG": SHORT_CONFIG, "EXTRA": SHORT_EXTRA,
           "LAUNCHER": launcher, **ROOT_MPI_ENV, **LOOPBACK_MPI}
    before = slurm.newest_job(all_states=True)
    t = time.monotonic()
    sbatch = subprocess.Popen(["sbatch", "--wait", str(SLURM_SCRIPT)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # (the early warning --signal=B:USR1@120 and requeueing: tests/test_faults.py)
        job_id = wait_for(lambda: (j := slurm.newest_job(all_states=True)) != before and j, 60, "the job")
        log_path = ROOT / "runs" / f"slurm-{job_id}.out"
        stdout, stderr = sbatch.communicate(timeout=RUN_TIMEOUT)
    finally:
        if sbatch.poll() is None:
            sbatch.kill()
    seconds = time.monotonic() - t
    print(f"Slurm job {job_id} ({launcher}): {seconds:.0f} s")
    log = log_path.read_text() if log_path.exists() else f"(no {log_path})\n{slurm.logs()}"
    assert f"Submitted batch job {job_id}" in stdout, f"sbatch: {stdout} {stderr}"
    job = slurm.job_fields(job_id)
    assert sbatch.returncode == 0, f"sbatch --wait -> {sbatch.returncode}: {stderr}\n{log[-4000:]}"
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
    run_dir = ROOT / "runs" / job_id
    assert last_line(log) == f"fmnist-dist: done: report in {run_dir}/report.md"
    assert f"launch  {expected}" in log
    check_report(read_report(run_dir, log), log, {slurm.node: [0, 1]})
    shutil.rmtree(run_dir)
    log_path.unlink()


# ---------------------------------------------------------------------------------------------
# Two nodes: network namespaces with their own hostnames, sshd in each, mpirun over ssh


@pytest.mark.slow
def test_pbs_job_on_two_nodes(tmp_path):
    need("ip", "unshare", "sshd", "ssh", "ssh-keygen", "mpirun")
    with two_nodes(tmp_path / "nodes") as nodes:
        hosts = [name for name, *_ in NODES]
        rc, log, run_dir, seconds = run_pbs_job(tmp_path, hosts, wrap=lambda cmd: in_node(NODES[0], cmd),
                                                CONFIG=SHORT_CONFIG, EXTRA=SHORT_EXTRA,
                                                FMNIST_MPI_ARGS=nodes.mpi_args)
    print(f"PBS job on two nodes: {seconds:.0f} s")
    assert rc == 0, log[-4000:]
    assert "--mca btl_tcp_if_include 10.213.7.0/24" in log               # the plan used the veth subnet
    report = read_report(run_dir, log)
    check_report(report, log, {"fmnode1": [0], "fmnode2": [1]})
    assert report["world"]["ranks"][0]["threads"] == 2                   # 1 rank per 2-core node
    shutil.rmtree(run_dir)
