"""The stall watchdog: a rank that stops responding ends the job within train.stall_timeout seconds,
with one line naming it.

Why a thread with its own sockets: a rank that is stopped (SIGSTOP, a node swapping) or hung (a
read on a dead shared file system) leaves the others waiting inside a C++ collective, where no
Python signal handler runs and Horovod sets no timeout on the MPI path. So beside the training,
every rank runs a daemon thread that talks to rank 0's thread over plain TCP, outside Horovod and
MPI: each sends a heartbeat (its host, its phase and how long since its main thread last made
progress) every `interval` seconds, and rank 0 sends every rank the table of all of them.

When a rank's own main thread has made no progress for the timeout, the job is stuck. The culprit
is a rank whose heartbeats stopped (its whole process is frozen), else the rank that made progress
least recently (its main thread is hung while the others wait for it). Rank 0 ends the job; the
others give it `grace` seconds more, and end it themselves when rank 0 is the silent one. Ending
means one line on stderr, the `on_stall` hook (rank 0 marks its report failed and releases the run
directory), then `os._exit`: the launcher (horovodrun, mpirun, srun --kill-on-bad-exit) ends the
other ranks, and the checkpoints are untouched (each is complete, or a temporary directory).
"""
from __future__ import annotations

import fcntl
import json
import os
import selectors
import socket
import struct
import sys
import threading
import time
from typing import Callable

EXIT_STALLED = 124          # as timeout(1): the job gave up waiting
SIOCGIFADDR = 0x8915
HOOK_SECONDS = 10.0         # the on_stall hook may not delay the exit longer than this


class Progress:
    """What the main thread last did, read by the watchdog thread (plain attributes: atomic enough)."""

    def __init__(self):
        self.phase, self.detail, self.at, self.waiting = "start", "", time.monotonic(), False

    def mark(self, phase: str, detail: str = "", waiting: bool = False) -> None:
        self.phase, self.detail, self.at, self.waiting = phase, detail, time.monotonic(), waiting


PROGRESS = Progress()


def mark(phase: str, detail: str = "", waiting: bool = False) -> None:
    """The main thread moved on (a step, a phase); waiting: it now waits for the other ranks in a
    collective, so it is not the rank that holds them up. Called often: it only sets attributes."""
    PROGRESS.mark(phase, detail, waiting)


class Watchdog:
    def __init__(self, rank: int, size: int, host: str, timeout: float, on_stall: Callable[[str], None] | None):
        self.rank, self.size, self.host, self.timeout = rank, size, host, timeout
        self.interval = min(5.0, max(0.5, timeout / 20))
        self.silent_after = 3 * self.interval      # no heartbeat for this long: the process is frozen
        self.grace = 2 * self.interval + 5.0       # what ranks > 0 leave rank 0 to act first
        self.on_stall = on_stall
        self.peers: dict[int, dict] = {}           # rank -> last heartbeat, with "received" (monotonic)
        self.selector = selectors.DefaultSelector()
        self.server: socket.socket | None = None
        self.conns: list[socket.socket] = []
        self.buffers: dict[socket.socket, bytes] = {}
        self.stopped = threading.Event()
        self.hub_closed = False                    # ranks > 0: rank 0 closed its end (it exited)

    # ------------------------------------------------------------------ connections
    def listen(self) -> dict:
        """Rank 0: a listening socket on every interface; returns where the others can reach it."""
        self.server = socket.create_server(("", 0), backlog=max(8, self.size))
        self.server.setblocking(False)
        self.selector.register(self.server, selectors.EVENT_READ)
        return {"port": self.server.getsockname()[1], "addresses": local_addresses()}

    def connect(self, hub: dict) -> bool:
        """Ranks > 0: connect to rank 0's watchdog, trying each of its addresses."""
        for address in hub["addresses"]:
            try:
                conn = socket.create_connection((address, hub["port"]), timeout=3)
            except OSError:
                continue
            self._add(conn)
            return True
        return False

    def _add(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        self.conns.append(conn)
        self.buffers[conn] = b""
        self.selector.register(conn, selectors.EVENT_READ)

    # ------------------------------------------------------------------ the thread
    def start(self) -> None:
        threading.Thread(target=self._run, name="fmnist-watchdog", daemon=True).start()

    def stop(self) -> None:
        self.stopped.set()

    def _run(self) -> None:
        next_beat = 0.0
        while not self.stopped.is_set():
            for key, _ in self.selector.select(timeout=self.interval / 4):
                self._readable(key.fileobj)
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + self.interval
                self._beat(now)
                verdict = self.verdict(now)
                if verdict:
                    self._end_job(verdict)

    def _readable(self, sock) -> None:
        if sock is self.server:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self._add(conn)
            return
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:                       # the peer closed: its rank ended (or died; the launcher sees that)
            self.hub_closed = self.hub_closed or self.rank != 0
            self.selector.unregister(sock)
            self.conns.remove(sock)
            sock.close()
            return
        lines = (self.buffers[sock] + data).split(b"\n")
        self.buffers[sock] = lines.pop()
        for line in lines:
            try:
                self._received(json.loads(line))
            except (ValueError, KeyError, TypeError):
                continue                   # not a heartbeat (a stray connection): ignored

    def _received(self, message: dict) -> None:
        """A heartbeat, or rank 0's table; a relayed beat is as old as rank 0 says it is."""
        now = time.monotonic()
        for beat in message["beats"]:
            if beat["rank"] != self.rank:
                beat["received"] = now - beat.get("relayed_age", 0.0)
                self.peers[beat["rank"]] = beat

    def own_beat(self, now: float) -> dict:
        return {"rank": self.rank, "host": self.host, "pid": os.getpid(), "phase": PROGRESS.phase,
                "detail": PROGRESS.detail, "progress_age": now - PROGRESS.at, "waiting": PROGRESS.waiting}

    def _beat(self, now: float) -> None:
        """Ranks > 0 send their own heartbeat; rank 0 sends everyone the whole table."""
        beats = [self.own_beat(now)]
        if self.rank == 0:
            beats += [{**b, "relayed_age": now - b["received"]} for b in self.peers.values()]
        payload = (json.dumps({"beats": beats}, default=str) + "\n").encode()
        for conn in list(self.conns):
            try:
                conn.send(payload)         # best effort: a frozen peer's full buffer drops a beat
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                pass

    # ------------------------------------------------------------------ the decision
    def verdict(self, now: float) -> str | None:
        """The line that ends the job, or None while this rank's main thread still makes progress."""
        stuck = now - PROGRESS.at
        if stuck < self.timeout:
            return None
        silent = sorted(r for r, b in self.peers.items() if now - b["received"] > self.silent_after)
        if self.rank != 0 and (self.hub_closed or 0 not in silent) and stuck < self.timeout + self.grace:
            return None                    # rank 0 names the culprit (or exited: the launcher ends the job)
        if self.rank != 0 and 0 in silent and not self.hub_closed:
            silent = [0]                   # rank 0 relays the others: its silence hides theirs
        if self.rank != 0 and self.hub_closed:
            silent, why = [], "rank 0 ended, and the launcher did not end this rank"
        elif silent:
            beat = self.peers[silent[0]]
            why = (f"rank {beat['rank']} on {beat['host']} (pid {beat['pid']}) stopped responding: "
                   f"no heartbeat for {now - beat['received']:.0f} s, last seen in {where(beat)}")
        else:
            culprit = self.slowest(now)
            why = (f"rank {culprit['rank']} on {culprit['host']} (pid {culprit['pid']}) made no progress for "
                   f"{culprit['progress_age']:.0f} s, in {where(culprit)}")
        others = f"{len(silent) - 1} more rank(s) silent; " if len(silent) > 1 else ""
        return (f"stalled: {why}; {others}rank {self.rank} on {self.host} waited {stuck:.0f} s "
                f"(train.stall_timeout={self.timeout:g}); ending the job, the checkpoints are intact")

    def slowest(self, now: float) -> dict:
        """The rank the others wait for: of those not waiting in a collective, the one whose main
        thread moved on least recently."""
        beats = [self.own_beat(now)] + [{**b, "progress_age": b["progress_age"] + now - b["received"]}
                                         for b in self.peers.values()]
        working = [b for b in beats if not b.get("waiting")] or beats
        return max(working, key=lambda b: b["progress_age"])

    def _end_job(self, line: str) -> None:
        sys.stderr.write(f"fmnist-dist: error: {line}\n")
        sys.stderr.flush()
        if self.on_stall is not None:      # bounded: a hung file system must not keep the job alive
            hook = threading.Thread(target=self._call_hook, args=(line,), daemon=True)
            hook.start()
            hook.join(HOOK_SECONDS)
        os._exit(EXIT_STALLED)

    def _call_hook(self, line: str) -> None:
        try:
            self.on_stall(line)
        except Exception as e:             # the exit matters more than the record
            sys.stderr.write(f"fmnist-dist: warning: could not record the stall: {e}\n")


ACTIVE: Watchdog | None = None


def linger_until_others_exit(limit_s: float = 10.0) -> None:
    """Rank 0, before a non-zero exit every rank takes (exit 75 after a clean stop): wait until the
    other ranks' connections close, i.e. they exited. srun --kill-on-bad-exit and mpirun end the
    ranks still running when one exits non-zero, which would turn their 75 into 143."""
    if ACTIVE is None or ACTIVE.rank != 0:
        return
    deadline = time.monotonic() + limit_s
    while ACTIVE.conns and time.monotonic() < deadline:
        time.sleep(0.05)


def where(beat: dict) -> str:
    return f"phase {beat['phase']}" + (f" ({beat['detail']})" if beat.get("detail") else "")


def local_addresses() -> list[str]:
    """This host's IPv4 addresses, loopback last (ranks on this host can use it, others cannot)."""
    found = []
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
            except OSError:
                continue                   # an interface without an IPv4 address
            found.append(socket.inet_ntoa(packed[20:24]))
    finally:
        probe.close()
    return sorted(set(found), key=lambda a: (a.startswith("127."), a))


def start(rt, timeout: float, on_stall: Callable[[str], None] | None = None) -> Watchdog | None:
    """Every rank, after Horovod started: rank 0 listens, the others connect (a collective: the
    address is broadcast). Returns None when train.stall_timeout is 0 (off) or there is one rank."""
    global ACTIVE
    if not timeout or rt.size < 2:
        return None
    dog = Watchdog(rt.rank, rt.size, rt.host, timeout, on_stall)
    hub = dog.listen() if rt.rank == 0 else None
    hub = rt.hvd_tf.broadcast_object(hub, root_rank=0)
    if rt.rank != 0 and not dog.connect(hub):
        print(f"fmnist-dist: warning: rank {rt.rank} on {rt.host} cannot reach rank 0's stall watchdog at "
              f"{hub['addresses']} port {hub['port']}; a stalled rank 0 would not be detected from here",
              file=sys.stderr, flush=True)
    mark("start-up", "data, run directory, model")
    dog.start()
    ACTIVE = dog
    return dog
