"""The stall watchdog's decision, and its heartbeats over real sockets, in one process (the jobs
that stall for real are in test_stall.py)."""
from __future__ import annotations

import time

import pytest

from fmnist_dist.training import watchdog
from fmnist_dist.training.watchdog import Watchdog

TIMEOUT = 20.0


def beat(rank: int, received: float, progress_age: float, waiting: bool = False, phase: str = "training") -> dict:
    return {"rank": rank, "host": f"node{rank}", "pid": 100 + rank, "phase": phase, "detail": "",
            "progress_age": progress_age, "waiting": waiting, "received": received}


@pytest.fixture
def stuck_for():
    """This process's main thread last moved on `seconds` ago."""
    def set_age(seconds: float, waiting: bool = True) -> float:
        now = time.monotonic()
        watchdog.PROGRESS.mark("waiting for the other ranks" if waiting else "checkpoint", waiting=waiting)
        watchdog.PROGRESS.at = now - seconds
        return now
    yield set_age
    watchdog.PROGRESS.mark("start")


def dog(rank: int, size: int = 3) -> Watchdog:
    return Watchdog(rank, size, f"node{rank}", TIMEOUT, None)


def test_no_verdict_while_this_rank_moves_on(stuck_for):
    d = dog(0)
    now = stuck_for(TIMEOUT - 1)
    d.peers = {1: beat(1, now - 60, 60)}                 # even with a silent peer
    assert d.verdict(now) is None


def test_rank0_names_the_silent_rank(stuck_for):
    d = dog(0)
    now = stuck_for(TIMEOUT + 1)
    d.peers = {1: beat(1, now - 0.5, TIMEOUT, waiting=True), 2: beat(2, now - 25, 3)}
    line = d.verdict(now)
    assert line.startswith("stalled: rank 2 on node2 (pid 102) stopped responding: no heartbeat for 25 s")


def test_rank0_names_the_rank_that_is_not_waiting(stuck_for):
    """Every rank still sends heartbeats (a hung read, not a frozen process): the one doing local
    work for longest is the culprit, not the ones waiting in the collective for it."""
    d = dog(0)
    now = stuck_for(TIMEOUT + 2, waiting=True)
    d.peers = {1: beat(1, now - 0.5, TIMEOUT + 5, waiting=True), 2: beat(2, now - 0.5, TIMEOUT + 1, phase="data")}
    assert "rank 2 on node2 (pid 102) made no progress for 22 s, in phase data" in d.verdict(now)


def test_other_ranks_leave_rank0_to_act_unless_it_is_silent(stuck_for):
    d = dog(1)
    now = stuck_for(TIMEOUT + 1)
    d.peers = {0: beat(0, now - 0.5, TIMEOUT + 1, waiting=True), 2: beat(2, now - 30, 30)}
    assert d.verdict(now) is None                         # rank 0 is alive: it names rank 2
    now = stuck_for(TIMEOUT + d.grace + 1)
    assert "rank 2 on node2" in d.verdict(now)           # ... unless it did not, within the grace
    d.peers[0] = beat(0, now - 10, 10, phase="checkpoint")
    now = stuck_for(TIMEOUT + 1)
    assert d.verdict(now).startswith("stalled: rank 0 on node0 (pid 100) stopped responding")


def test_rank0_exited_is_not_blamed(stuck_for):
    d = dog(1)
    d.hub_closed = True
    now = stuck_for(TIMEOUT + 1)
    d.peers = {0: beat(0, now - 10, 10)}
    assert d.verdict(now) is None
    now = stuck_for(TIMEOUT + d.grace + 1)
    assert "rank 0 ended, and the launcher did not end this rank" in d.verdict(now)


def test_heartbeats_and_the_relayed_table_over_real_sockets():
    hub, spoke = dog(0, size=2), dog(1, size=2)
    address = hub.listen()
    assert spoke.connect({"port": address["port"], "addresses": address["addresses"]})
    for _ in range(40):                                   # a few rounds of the threads' work, by hand
        for d in (hub, spoke):
            for key, _ in d.selector.select(timeout=0.01):
                d._readable(key.fileobj)
            d._beat(time.monotonic())
        if 1 in hub.peers and 0 in spoke.peers:
            break
    assert hub.peers[1]["host"] == "node1" and spoke.peers[0]["host"] == "node0"
    assert time.monotonic() - spoke.peers[0]["received"] < 1.0


def test_local_addresses_put_loopback_last():
    found = watchdog.local_addresses()
    assert found and all(a.count(".") == 3 for a in found)
    assert [a.startswith("127.") for a in found] == sorted(a.startswith("127.") for a in found)
