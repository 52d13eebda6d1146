"""Full mesh of three podnet nodes: real ExaBGP speakers in node namespaces exchange their block routes."""

from __future__ import annotations

import pytest

from bgp.plan import plan_peers
from datastore import model as m
from testbed.netns import NetnsBed
from tests.netns.test_bgp_support import FAST, established, make_cluster, settled, speakers, wait

pytestmark = pytest.mark.netns

BLOCKS = {"a": "10.244.1.0/26", "b": "10.244.2.0/26", "c": "10.244.3.0/26"}


def test_full_mesh_exchanges_blocks(netns_bed: NetnsBed) -> None:
    cl = make_cluster(netns_bed, [("a", 11), ("b", 12), ("c", 13)])
    cfg = m.ClusterConfig()
    with speakers(cl, "abc") as sp:
        for name, s in sp.items():
            s.set_peers(plan_peers(name, cl.models, cfg, (), FAST))
            s.announce([BLOCKS[name]])
        for name, s in sp.items():
            wait(lambda s=s: established(s) and len(s.peer_status()) == 2, 20, f"{name} sessions up")

        def learned() -> bool:
            for name, s in sp.items():
                want = {BLOCKS[o]: cl.models[o].address for o in "abc" if o != name}
                got = {p: r.next_hop for p, r in s.best_routes().items()}
                if got != want:
                    return False
            return True

        wait(learned, 10, "every node learns the other two blocks with the owner as next hop")
        # the one pair, one session rule: the lower address is passive
        kinds = {(p.address, p.kind) for p in sp["a"].peer_status()}
        assert kinds == {(cl.models["b"].address, "node-to-node mesh"), (cl.models["c"].address, "node-to-node mesh")}

        # a new block on b reaches a and c; withdrawing it removes it
        sp["b"].announce([BLOCKS["b"], "10.244.9.0/26"])
        wait(lambda: all("10.244.9.0/26" in sp[n].best_routes() for n in "ac"), 5, "new block propagates")
        sp["b"].announce([BLOCKS["b"]])
        wait(lambda: all("10.244.9.0/26" not in sp[n].best_routes() for n in "ac"), 5, "withdrawal propagates")
        assert sp["a"].best_routes()[BLOCKS["b"]].next_hop == cl.models["b"].address


def test_peer_set_changes_keep_unrelated_sessions(netns_bed: NetnsBed) -> None:
    cl = make_cluster(netns_bed, [("a", 11), ("b", 12), ("c", 13), ("d", 14)])
    cfg = m.ClusterConfig()
    blocks = {**BLOCKS, "d": "10.244.4.0/26"}
    three = {n: cl.models[n] for n in "abc"}
    with speakers(cl, "abcd") as sp:
        for name in "abc":
            sp[name].set_peers(plan_peers(name, three, cfg, (), FAST))
            sp[name].announce([blocks[name]])
        wait(lambda: all(established(sp[n]) and len(sp[n].best_routes()) == 2 for n in "abc"), 20, "3-node mesh")
        wait(lambda: all(settled(sp[n], 1.0) for n in "abc"), 15, "sessions settled")
        since = {n: {p.address: p.since for p in sp[n].peer_status()} for n in "abc"}

        # d joins: everyone gains a session; the existing ones are not reset
        for name in "abcd":
            sp[name].set_peers(plan_peers(name, cl.models, cfg, (), FAST))
        sp["d"].announce([blocks["d"]])
        wait(lambda: all(established(sp[n]) and len(sp[n].best_routes()) == 3 for n in "abcd"), 20, "4-node mesh")
        for n in "abc":
            now = {p.address: p.since for p in sp[n].peer_status()}
            assert {a: now[a] for a in since[n]} == since[n], f"{n} reset a session when d joined"
        assert {p: r.next_hop for p, r in sp["d"].best_routes().items()} == {
            blocks[n]: cl.models[n].address for n in "abc"
        }

        # c leaves a's and b's peer sets: its routes go from their RIBs, a-b stays up
        without_c = {n: cl.models[n] for n in "abd"}
        for name in "abd":
            sp[name].set_peers(plan_peers(name, without_c, cfg, (), FAST))
        wait(lambda: all(blocks["c"] not in sp[n].best_routes() for n in "abd"), 10, "c's block gone")
        assert [p.since for p in sp["a"].peer_status() if p.address == cl.models["b"].address] == [
            since["a"][cl.models["b"].address]
        ]
        assert established(sp["a"]) and blocks["b"] in sp["a"].best_routes()
