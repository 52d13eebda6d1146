"""Faults: a hung node is withdrawn within the hold time; a killed node's routes are kept for its graceful-restart
time, then dropped (without graceful restart: at once); restarting ExaBGP or the whole speaker causes no
withdrawal at the peers (graceful restart); a killed bridge helper is respawned and resynchronised without
touching the sessions."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from bgp.plan import Defaults, plan_peers
from bgp.speaker import Speaker
from datastore import model as m
from testbed.netns import NetnsBed
from tests.netns.test_bgp_support import (
    AS,
    FAST,
    Bird,
    BirdPeer,
    established,
    make_cluster,
    settled,
    speakers,
    start_speaker,
    wait,
)

pytestmark = pytest.mark.netns

BLOCKS = {"a": "10.244.1.0/26", "b": "10.244.2.0/26", "c": "10.244.3.0/26"}
CFG = m.ClusterConfig()


def _mesh(sp: dict[str, Speaker], models: dict[str, m.Node], defaults: Defaults = FAST) -> None:
    for name, s in sp.items():
        s.set_peers(plan_peers(name, models, CFG, (), defaults))
        s.announce([BLOCKS[name]])
    for name, s in sp.items():
        others = {BLOCKS[o] for o in sp if o != name}
        wait(lambda s=s, others=others: established(s) and set(s.best_routes()) == others, 20, f"{name} converged")


def test_hung_node_is_withdrawn_within_hold_time(netns_bed: NetnsBed) -> None:
    cl = make_cluster(netns_bed, [("a", 11), ("b", 12), ("c", 13)])
    with speakers(cl, "abc") as sp:
        _mesh(sp, cl.models)
        pid = sp["a"].exabgp_pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # no FIN, no keepalives: only the hold timer notices
        try:
            t0 = time.monotonic()
            wait(lambda: all(BLOCKS["a"] not in sp[n].best_routes() for n in "bc"), 10, "a's block withdrawn")
            elapsed = time.monotonic() - t0
            assert elapsed <= FAST.hold_time + 1.5, f"withdrawn after {elapsed:.1f}s, hold time {FAST.hold_time}s"
            assert BLOCKS["c"] in sp["b"].best_routes()  # the other sessions are unaffected
        finally:
            os.kill(pid, signal.SIGCONT)


def test_killed_node_routes_kept_for_restart_time_then_dropped(netns_bed: NetnsBed) -> None:
    defaults = Defaults(hold_time=3, graceful_restart_time=4)
    cl = make_cluster(netns_bed, [("a", 11), ("b", 12)])
    with speakers(cl, "ab") as sp:
        _mesh(sp, cl.models, defaults)
        sp["a"].stop(withdraw=False)  # the agent and its ExaBGP die: no NOTIFICATION, the TCP session closes
        t0 = time.monotonic()
        wait(
            lambda: (
                sp["b"].best_routes().get(BLOCKS["a"], None) is not None and sp["b"].best_routes()[BLOCKS["a"]].stale
            ),
            5,
            "stale",
        )
        wait(lambda: BLOCKS["a"] not in sp["b"].best_routes(), 10, "dropped when the restart time ends")
        elapsed = time.monotonic() - t0
        assert defaults.graceful_restart_time - 0.5 <= elapsed <= defaults.graceful_restart_time + 2, elapsed


def test_killed_node_without_graceful_restart_is_withdrawn_within_hold_time(netns_bed: NetnsBed) -> None:
    defaults = Defaults(hold_time=3, graceful_restart_time=0)
    cl = make_cluster(netns_bed, [("a", 11), ("b", 12), ("c", 13)])
    with speakers(cl, "abc") as sp:
        _mesh(sp, cl.models, defaults)
        sp["a"].stop(withdraw=False)  # SIGKILL: the agent and its ExaBGP die without a NOTIFICATION
        t0 = time.monotonic()
        wait(lambda: all(BLOCKS["a"] not in sp[n].best_routes() for n in "bc"), 10, "a's block withdrawn")
        assert time.monotonic() - t0 <= defaults.hold_time
        assert all(not r.stale for n in "bc" for r in sp[n].best_routes().values())


def _bird_has(bird: Bird, prefix: str) -> bool:
    return prefix in bird.routes()


def test_graceful_restart_causes_no_withdrawal(netns_bed: NetnsBed, tmp_path: Path) -> None:
    cl = make_cluster(netns_bed, [("a", 11), ("b", 12), ("x", 30)])
    x_ip = cl.hosts["x"].address
    del cl.models["x"]
    bird = Bird(netns_bed, cl.hosts["x"], x_ip, 64600, tmp_path / "bird")
    bird.configure([BirdPeer(cl.models["a"].address, AS)])
    peer = m.BGPPeer(name="x", peer_ip=x_ip, as_number=64600, node="a", hold_time=3, graceful_restart_time=10)
    with speakers(cl, "ab") as sp:
        sp["b"].set_peers(plan_peers("b", cl.models, CFG, (), FAST))
        sp["b"].announce([BLOCKS["b"]])
        sp["a"].set_peers(plan_peers("a", cl.models, CFG, [peer], FAST))
        sp["a"].announce([BLOCKS["a"]])
        wait(lambda: BLOCKS["a"] in sp["b"].best_routes() and _bird_has(bird, BLOCKS["a"]), 20, "converged")
        wait(lambda: established(sp["a"]), 20, "a's sessions up")

        gaps: list[str] = []
        stop = threading.Event()

        def watch() -> None:  # observe the peers continuously while a restarts
            while not stop.is_set():
                if BLOCKS["a"] not in sp["b"].best_routes():
                    gaps.append("b lost a's block")
                if not _bird_has(bird, BLOCKS["a"]):
                    gaps.append("BIRD lost a's block")
                time.sleep(0.01)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            # 1. ExaBGP dies: the speaker restarts it and re-announces before its End-of-RIB
            old = sp["a"].exabgp_pid
            assert old is not None
            os.kill(old, signal.SIGKILL)
            wait(lambda: sp["a"].exabgp_pid not in (None, old), 10, "ExaBGP restarted")
            wait(lambda: established(sp["a"]) and not sp["b"].best_routes()[BLOCKS["a"]].stale, 20, "re-learned")
            assert sp["a"].restarts == 1
            # 2. the whole speaker (the agent) restarts
            workdir = sp["a"].workdir
            sp["a"].stop(withdraw=False)
            sp["a"] = start_speaker(cl, "a", workdir, CFG)
            sp["a"].set_peers(plan_peers("a", cl.models, CFG, [peer], FAST))
            sp["a"].announce([BLOCKS["a"]])
            wait(lambda: established(sp["a"]) and not sp["b"].best_routes()[BLOCKS["a"]].stale, 20, "re-learned")
            wait(lambda: BLOCKS["b"] in sp["a"].best_routes(), 10, "a re-learns b's block")
        finally:
            stop.set()
            watcher.join()
        assert gaps == []


def test_killed_bridge_is_respawned_and_resynchronised(netns_bed: NetnsBed) -> None:
    cl = make_cluster(netns_bed, [("a", 11), ("b", 12)])
    with speakers(cl, "ab") as sp:
        _mesh(sp, cl.models)
        wait(lambda: all(settled(s, 1.0) for s in sp.values()), 15, "sessions settled")
        since = {p.address: p.since for s in sp.values() for p in s.peer_status()}
        exabgp, bridge = sp["a"].exabgp_pid, sp["a"].bridge_pid
        assert bridge is not None
        os.kill(bridge, signal.SIGKILL)
        wait(lambda: sp["a"].bridge_pid not in (None, bridge), 10, "ExaBGP respawned the bridge")
        assert sp["a"].exabgp_pid == exabgp  # only the helper restarted
        # commands flow again (a -> b) and so do events (b -> a)
        sp["a"].announce([BLOCKS["a"], "10.244.11.0/26"])
        sp["b"].announce([BLOCKS["b"], "10.244.12.0/26"])
        wait(lambda: "10.244.11.0/26" in sp["b"].best_routes(), 5, "a's new block reaches b")
        wait(lambda: "10.244.12.0/26" in sp["a"].best_routes(), 5, "b's new block reaches a")
        wait(lambda: not sp["a"].best_routes()[BLOCKS["b"]].stale, 5, "b re-sent its routes on route refresh")
        # the sessions were never reset
        assert {p.address: p.since for s in sp.values() for p in s.peer_status()} == since
        assert all(p.state == "Established" for s in sp.values() for p in s.peer_status())
