"""Real components for the job-script tests: a one-node Slurm cluster, two "nodes" made of network
namespaces with sshd, and the environment a PBS job sees. No mocks: the daemons are Debian's.

Everything started here is stopped by process id, and everything changed (namespaces, veth pair,
/etc/hosts lines) is undone in a `finally`.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Short training for the job tests: 1 epoch of 100 steps (~25,600 images over 2 ranks) of the lean
# recipe. Its short warm-up and cosine decay end a 100-step run settled; the default recipe's
# one-epoch warm-up leaves such a run at its peak learning rate (test accuracy seen from 32% to 85%).
SHORT_CONFIG = "configs/fast.yaml"
SHORT_EXTRA = "train.epochs=1 train.steps_per_epoch=100"
# Default PATH of a batch job (Torque/OpenPBS and Slurm jobs start from a login-like PATH).
JOB_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Open MPI as root refuses to start without these (set only for tests; the job scripts set them
# themselves only when running as root).
ROOT_MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def unavailable(reason: str):
    """Skip on a developer machine without the pieces; in CI the test must run, so fail."""
    if IN_CI:
        pytest.fail(f"CI=true but this test cannot run: {reason} (run: bash scripts/setup.sh test as root)")
    pytest.skip(reason)


def need(*programs: str, root: bool = True) -> None:
    missing = [p for p in programs if not shutil.which(p, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]
    if missing:
        unavailable(f"missing programs: {' '.join(missing)}")
    if root and os.geteuid() != 0:
        unavailable("needs root (daemons, namespaces)")
    if not (VENV / "bin" / "python").exists():
        unavailable(f"no {VENV} (run: bash scripts/setup.sh test)")


def sbin(name: str) -> str:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or name


def short_host() -> str:
    return socket.gethostname().split(".")[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def stop_pid(proc: subprocess.Popen | None, timeout: float = 20) -> None:
    """SIGTERM the process we started (by its pid), SIGKILL if it does not go."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} missing)"


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# ---------------------------------------------------------------------------------------------
# The environment of a PBS batch job


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
# A one-node Slurm cluster


class SlurmCluster:
    """munged + slurmctld + slurmd of Debian's slurm-wlm, configured in a temp dir, one node =
    this host with its real CPU count. Client commands need `env` (SLURM_CONF)."""

    def __init__(self, base: Path):
        self.base = base
        self.procs: dict[str, subprocess.Popen] = {}
        self.node = short_host()
        self.conf = base / "slurm.conf"
        # munged wants its socket's directories searchable by all (pytest's temp dirs are 0700).
        self.munge_dir = Path(tempfile.mkdtemp(prefix="fmnist-munge-", dir="/run" if os.access("/run", os.W_OK) else None))
        os.chmod(self.munge_dir, 0o755)
        self.munge_socket = self.munge_dir / "munge.socket"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def write_config(self) -> None:
        b = self.base
        b.mkdir(parents=True, exist_ok=True)
        for d in ("munge", "state", "spool", "log"):
            (b / d).mkdir(mode=0o700, exist_ok=True)
        hw = subprocess.run([sbin("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
        node_line = hw.splitlines()[0].split()   # NodeName=vm CPUs=2 Boards=1 ... RealMemory=24105
        fields = dict(item.split("=", 1) for item in node_line)
        hardware = " ".join(f"{k}={fields[k]}" for k in ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket",
                                                           "ThreadsPerCore") if k in fields)
        memory = max(1, int(fields.get("RealMemory", "1024")) - 512)
        self.cpus = int(fields["CPUs"])
        # Job ids start from a time-based number so runs/<job id> of earlier test runs never collide.
        first_job_id = 1_000_000 + int(time.time()) % 60_000_000
        self.conf.write_text(f"""\
# Generated by tests/cluster.py: a one-node test cluster.
ClusterName=fmnisttest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={b / 'state'}
SlurmdSpoolDir={b / 'spool'}
SlurmctldPidFile={b / 'slurmctld.pid'}
SlurmdPidFile={b / 'slurmd.pid'}
SlurmctldLogFile={b / 'log' / 'slurmctld.log'}
SlurmdLogFile={b / 'log' / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
FirstJobId={first_job_id}
SchedulerType=sched/backfill
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=600
KillWait=10
NodeName={self.node} NodeAddr=127.0.0.1 {hardware} RealMemory={memory} State=UNKNOWN
PartitionName=test Nodes={self.node} Default=YES MaxTime=60 State=UP
""")

    def start(self) -> None:
        self.write_config()
        b = self.base
        key = b / "munge" / "munge.key"
        subprocess.run([sbin("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
        os.chmod(key, 0o400)
        self._spawn("munged", [sbin("munged"), "--foreground", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={b / 'munge' / 'munged.pid'}",
                               f"--log-file={b / 'log' / 'munged.log'}", f"--seed-file={b / 'munge' / 'seed'}"])
        wait_for(lambda: self.munge_socket.exists(), 30, "munged's socket")
        self._spawn("slurmctld", [sbin("slurmctld"), "-D", "-f", str(self.conf)])
        self._spawn("slurmd", [sbin("slurmd"), "-D", "-f", str(self.conf), "-N", self.node])
        wait_for(self.node_idle, 120, f"node {self.node} to be idle in slurmctld")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.base / "log" / f"{name}.stdout", "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        time.sleep(0.5)
        if self.procs[name].poll() is not None:
            raise RuntimeError(f"{name} exited at once ({self.procs[name].returncode}):\n{self.logs()}")

    def node_idle(self) -> bool:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} died ({proc.returncode}):\n{self.logs()}")
        out = self.scontrol("show", "node", self.node, check=False)
        return "State=IDLE" in out

    def scontrol(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(["scontrol", *args], capture_output=True, text=True, env=self.env, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"scontrol {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def job_fields(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (kept after the end for MinJobAge=600 s)."""
        out = self.scontrol("show", "job", "-o", job_id)
        fields = {}
        for item in out.split():
            if "=" in item:
                k, _, v = item.partition("=")
                fields.setdefault(k, v)
        return fields

    def job_processes(self, job_id: str) -> bool:
        """Whether a slurmstepd of the job (any attempt) still runs on this machine."""
        return subprocess.run(["pgrep", "-f", rf"^slurmstepd: \[{job_id}\."], capture_output=True).returncode == 0

    def newest_job(self, all_states: bool = False) -> str | None:
        cmd = ["squeue", "-h", "-o", "%i"] + (["--states=all"] if all_states else [])
        out = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=60).stdout.split()
        return max(out, key=int) if out else None

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{tail(p)}" for p in sorted((self.base / "log").glob("*")))

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld", "munged"):
            stop_pid(self.procs.get(name))
        shutil.rmtree(self.munge_dir, ignore_errors=True)


@contextlib.contextmanager
def slurm_cluster(base: Path):
    cluster = SlurmCluster(base)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


# ---------------------------------------------------------------------------------------------
# Two nodes: network namespaces joined by a veth pair, each with its own hostname and sshd


SUBNET = "10.213.7"          # a private /24 used only inside the two namespaces
NODES = [("fmnode1", "fmnist-ns1", "fmnist-veth1", f"{SUBNET}.1"),
         ("fmnode2", "fmnist-ns2", "fmnist-veth2", f"{SUBNET}.2")]
HOSTS_MARK = "# fmnist-dist two-node test"
LOCK_FILE = "/run/lock/fmnist-dist-two-node.lock"


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} -> {proc.returncode}: {proc.stderr.strip()}")
    return proc


def in_node(node: tuple, cmd: list[str]) -> list[str]:
    """The command inside the node's network namespace, under its own hostname (new UTS namespace)."""
    hostname, netns, _, _ = node
    script = 'hostname "$0" && exec "$@"'
    return [sbin("ip"), "netns", "exec", netns, "unshare", "--uts", "sh", "-c", script, hostname, *cmd]


class TwoNodes:
    def __init__(self, base: Path):
        self.base = base
        self.sshd: list[subprocess.Popen] = []
        self.ssh_config = base / "ssh_config"
        self.mpi_args = (f"--mca btl_tcp_if_include {SUBNET}.0/24 --mca oob_tcp_if_include {SUBNET}.0/24 "
                         f"--mca plm_rsh_args \"-F {self.ssh_config}\"")

    def start(self) -> None:
        self.teardown_network()           # leftovers of an interrupted run
        b = self.base
        b.mkdir(parents=True, exist_ok=True)
        # Network: ns1 [veth1 10.213.7.1/24] <-> [veth2 10.213.7.2/24] ns2
        for _, netns, _, _ in NODES:
            run([sbin("ip"), "netns", "add", netns])
        (h1, ns1, v1, a1), (h2, ns2, v2, a2) = NODES
        run([sbin("ip"), "link", "add", v1, "netns", ns1, "type", "veth", "peer", "name", v2, "netns", ns2])
        for _, netns, veth, addr in NODES:
            run([sbin("ip"), "-n", netns, "addr", "add", f"{addr}/24", "dev", veth])
            run([sbin("ip"), "-n", netns, "link", "set", veth, "up"])
            run([sbin("ip"), "-n", netns, "link", "set", "lo", "up"])
        self.add_hosts_lines()
        # ssh: a root key for this test only, known_hosts in the temp dir.
        key = b / "id_ed25519"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)])
        (b / "authorized_keys").write_text((b / "id_ed25519.pub").read_text())
        os.chmod(b / "authorized_keys", 0o600)
        self.ssh_config.write_text(f"""\
Host fmnode1 fmnode2
  User root
  IdentityFile {key}
  IdentitiesOnly yes
  BatchMode yes
  StrictHostKeyChecking no
  UserKnownHostsFile {b / 'known_hosts'}
  GlobalKnownHostsFile /dev/null
  LogLevel ERROR
  ConnectTimeout 20
""")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)   # sshd's privilege-separation directory
        for node in NODES:
            hostname, _, _, addr = node
            hostkey = b / f"hostkey-{hostname}"
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey)])
            conf = b / f"sshd_config-{hostname}"
            conf.write_text(f"""\
ListenAddress {addr}
Port 22
HostKey {hostkey}
PidFile {b / f'sshd-{hostname}.pid'}
AuthorizedKeysFile {b / 'authorized_keys'}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
AcceptEnv LANG LC_*
""")
            log = open(b / f"sshd-{hostname}.log", "w")
            self.sshd.append(subprocess.Popen(in_node(node, [sbin("sshd"), "-D", "-e", "-f", str(conf)]),
                                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        for node in NODES:
            wait_for(lambda n=node: self.ssh_works(n), 60, f"sshd on {node[0]}")

    def ssh_works(self, node: tuple) -> bool:
        for proc in self.sshd:
            if proc.poll() is not None:
                raise RuntimeError(f"sshd exited ({proc.returncode}): {tail(self.base / 'sshd-fmnode1.log')}"
                                   f"\n{tail(self.base / 'sshd-fmnode2.log')}")
        other = NODES[1] if node is NODES[0] else NODES[0]
        proc = subprocess.run(in_node(other, ["ssh", "-F", str(self.ssh_config), node[0], "hostname"]),
                              capture_output=True, text=True, timeout=60)
        return proc.returncode == 0 and proc.stdout.strip() == node[0]

    def add_hosts_lines(self) -> None:
        with open("/etc/hosts", "a") as f:
            for hostname, _, _, addr in NODES:
                f.write(f"{addr} {hostname} {HOSTS_MARK}\n")

    @staticmethod
    def remove_hosts_lines() -> None:
        """Remove exactly our lines (others may edit /etc/hosts meanwhile); rewrite in place, since
        /etc/hosts may be a bind mount that cannot be replaced."""
        text = Path("/etc/hosts").read_text()
        kept = "".join(line for line in text.splitlines(keepends=True) if HOSTS_MARK not in line)
        if kept != text:
            with open("/etc/hosts", "r+") as f:
                f.write(kept)
                f.truncate()

    def teardown_network(self) -> None:
        existing = subprocess.run([sbin("ip"), "netns", "list"], capture_output=True, text=True).stdout
        for _, netns, _, _ in NODES:
            if netns in existing.split():
                subprocess.run([sbin("ip"), "netns", "delete", netns], capture_output=True)  # veth goes with it
        self.remove_hosts_lines()

    def stop(self) -> None:
        try:
            for proc in self.sshd:
                stop_pid(proc)
        finally:
            self.teardown_network()


@contextlib.contextmanager
def two_nodes(base: Path):
    Path(LOCK_FILE).parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)      # one two-node setup at a time on this machine
        nodes = TwoNodes(base)
        try:
            nodes.start()
            yield nodes
        finally:
            nodes.stop()


def python() -> str:
    return sys.executable
