"""Configured peers: a global BIRD peer receives every node's block; its own route is ignored unless the peer
accepts routes; a TCP-MD5 mismatch keeps a session down with a clear status and the right password brings it up;
an unusable peer is reported without disturbing the others; changing one peer leaves the other sessions alone."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from bgp.plan import plan_peers
from bgp.speaker import Speaker
from datastore import model as m
from testbed.netns import NetnsBed
from tests.netns.test_bgp_support import FAST, Bird, BirdPeer, established, make_cluster, settled, speakers, wait

pytestmark = pytest.mark.netns

BLOCKS = {"a": "10.244.1.0/26", "b": "10.244.2.0/26", "c": "10.244.3.0/26"}
OUTSIDE = "198.51.100.0/24"
CFG = m.ClusterConfig()


def _status(s: Speaker, address: str) -> tuple[str, str]:
    [p] = [p for p in s.peer_status() if p.address == address]
    return p.state, p.info


def test_global_peer_md5_and_policy(netns_bed: NetnsBed, tmp_path: Path) -> None:
    cl = make_cluster(netns_bed, [("a", 11), ("b", 12), ("c", 13), ("x", 30)])
    x_ip = cl.hosts["x"].address
    del cl.models["x"]
    addr = {n: cl.models[n].address for n in "abc"}
    bird = Bird(netns_bed, cl.hosts["x"], x_ip, 64600, tmp_path / "bird")
    good, bad = "s3cret key", "wrong"
    bird.configure(
        [
            BirdPeer(addr["a"], 64512, password=good),
            BirdPeer(addr["b"], 64512, password=good),
            BirdPeer(addr["c"], 64512, password=bad),
        ],
        static=[OUTSIDE],
    )
    x = m.BGPPeer(name="x", peer_ip=x_ip, as_number=64600, password=good, hold_time=3, graceful_restart_time=0)
    bogus = m.BGPPeer(name="self", peer_ip=addr["a"], as_number=64700, node="a")
    with speakers(cl, "abc") as sp:

        def configure(peer: m.BGPPeer) -> None:
            for name, s in sp.items():
                s.set_peers(plan_peers(name, cl.models, CFG, [peer, bogus], FAST))

        configure(x)
        for name, s in sp.items():
            s.announce([BLOCKS[name]])
        wait(lambda: all(established(sp[n]) for n in "ab"), 20, "a and b peer with x")
        wait(lambda: established(sp["c"], [addr["a"], addr["b"]]), 20, "c's mesh sessions")
        wait(lambda: set(bird.routes()) >= {BLOCKS["a"], BLOCKS["b"]}, 10, "BIRD has a's and b's blocks")

        # MD5 mismatch: c's session stays down, and says why
        wait(lambda: "TCP-MD5" in _status(sp["c"], x_ip)[1], 15, "c reports the MD5 failure")
        assert _status(sp["c"], x_ip)[0] != "Established"
        assert BLOCKS["c"] not in bird.routes()

        # an unusable peer is shown with its reason; every other session is up
        state, info = _status(sp["a"], addr["a"])
        assert state == "Invalid" and "own address" in info
        assert established(sp["a"], [addr["b"], addr["c"], x_ip])

        # the outside route is ignored: acceptRoutes is off
        assert OUTSIDE not in sp["a"].best_routes()

        # the right password brings c up, and BIRD then has every block with the owners as next hops
        bird.configure(
            [BirdPeer(addr[n], 64512, password=good) for n in "abc"],
            static=[OUTSIDE],
        )
        wait(lambda: established(sp["c"]), 20, "c's session with x comes up")
        wait(lambda: set(BLOCKS.values()) <= set(bird.routes()), 10, "BIRD has every block")
        for n in "abc":
            assert bird.routes()[BLOCKS[n]]["via"] == addr[n]

        # accepting the peer's routes: no session is reset (only a route refresh), the route appears
        # connection collisions can bounce a session that just came up: start from settled sessions
        wait(lambda: all(settled(sp[n], 1.5) for n in "abc"), 15, "sessions settled")
        since = {n: {p.address: p.since for p in sp[n].peer_status()} for n in "abc"}
        configure(replace(x, accept_routes=True))
        wait(lambda: all(OUTSIDE in sp[n].best_routes() for n in "abc"), 10, "outside route accepted")
        assert all(sp[n].best_routes()[OUTSIDE].next_hop == x_ip for n in "abc")
        after = {n: {p.address: p.since for p in sp[n].peer_status()} for n in "abc"}
        assert after == since, "accepting routes reset a session"

        # a changed password re-establishes only that session (and breaks it: BIRD keeps the old one)
        configure(replace(x, accept_routes=True, password="another"))
        wait(lambda: all(_status(sp[n], x_ip)[0] != "Established" for n in "abc"), 15, "x sessions reset")
        for n in "abc":
            mesh_since = {p.address: p.since for p in sp[n].peer_status() if p.kind == "node-to-node mesh"}
            assert mesh_since == {a: s for a, s in since[n].items() if a in mesh_since}, f"{n}: a mesh session reset"
            assert established(sp[n], mesh_since)
