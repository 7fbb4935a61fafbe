"""Two "nodes" on one machine: network namespaces joined by a veth pair, each with its own hostname
and sshd. Everything changed (namespaces, veth pair, /etc/hosts lines) is undone in a `finally`."""
from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
from pathlib import Path

from conftest import sbin, stop_pid, tail, wait_for

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
