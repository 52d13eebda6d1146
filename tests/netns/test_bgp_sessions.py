"""A session's reported state follows the real one through configuration changes: ten TCP-MD5 password changes in
a row against BIRD 2. While the passwords differ the peer is never reported Established (and BIRD agrees the
session is down); once they match again it comes back up."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest

from bgp.plan import plan_peers
from bgp.speaker import Speaker
from datastore import model as m
from testbed.netns import NetnsBed
from tests.netns.test_bgp_support import AS, FAST, Bird, BirdPeer, make_cluster, speakers, wait

pytestmark = pytest.mark.netns

CYCLES = 10
MISMATCH_WATCH = 2.0  # seconds watched after each change to a wrong password (ExaBGP tears down within ~0.1 s)
GOOD = "s3cret key"


def _state(s: Speaker, address: str) -> str:
    [p] = [p for p in s.peer_status() if p.address == address]
    return p.state


def test_password_changes_never_leave_a_down_session_reported_up(netns_bed: NetnsBed, tmp_path: Path) -> None:
    cl = make_cluster(netns_bed, [("a", 11), ("x", 30)])
    x_ip, a_ip = cl.hosts["x"].address, cl.hosts["a"].address
    del cl.models["x"]  # an external router
    bird = Bird(netns_bed, cl.hosts["x"], x_ip, 64600, tmp_path / "bird")
    bird.configure([BirdPeer(a_ip, AS, password=GOOD)])
    peer = m.BGPPeer(name="x", peer_ip=x_ip, as_number=64600, password=GOOD, hold_time=3, graceful_restart_time=0)

    def bird_established() -> bool:
        return any("Established" in line for line in bird.protocol_states().values())

    with speakers(cl, "a") as sp:
        s = sp["a"]

        def configure(p: m.BGPPeer) -> None:
            s.set_peers(plan_peers("a", cl.models, m.ClusterConfig(), [p], FAST))

        configure(peer)
        wait(lambda: _state(s, x_ip) == "Established", 30, "the session comes up")
        up_times: list[float] = []
        for cycle in range(CYCLES):
            configure(replace(peer, password=f"wrong {cycle}"))
            seen: set[str] = set()
            end = time.monotonic() + MISMATCH_WATCH
            while time.monotonic() < end:
                seen.add(_state(s, x_ip))
                time.sleep(0.01)
            assert "Established" not in seen, f"cycle {cycle}: reported Established with mismatched passwords"
            assert not bird_established(), f"cycle {cycle}: BIRD still has the session"  # it really is down

            t0 = time.monotonic()
            configure(peer)
            wait(lambda: _state(s, x_ip) == "Established", 30, f"cycle {cycle}: the session comes back up")
            up_times.append(time.monotonic() - t0)
            wait(bird_established, 10, f"cycle {cycle}: BIRD agrees")
        print(f"password restored -> Established: {', '.join(f'{t:.2f}' for t in up_times)} s")
