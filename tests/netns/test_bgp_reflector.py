"""Route reflection: (a) BIRD 2 reflects for three podnet nodes; (b) a podnet node reflects for three podnet
clients and a GoBGP client. Every client learns the others' blocks with ORIGINATOR_ID and CLUSTER_LIST set."""

from __future__ import annotations

from pathlib import Path

import pytest

from bgp.plan import plan_peers
from datastore import model as m
from testbed.netns import NetnsBed
from tests.netns.test_bgp_support import (
    AS,
    FAST,
    Bird,
    BirdPeer,
    GoBGP,
    established,
    make_cluster,
    speakers,
    wait,
)

pytestmark = pytest.mark.netns

BLOCKS = {"a": "10.244.1.0/26", "b": "10.244.2.0/26", "c": "10.244.3.0/26", "g": "10.244.7.0/26"}
NO_MESH = m.ClusterConfig(node_mesh=False)


def test_bird_reflects_for_podnet_nodes(netns_bed: NetnsBed, tmp_path: Path) -> None:
    cl = make_cluster(netns_bed, [("a", 11), ("b", 12), ("c", 13), ("rr", 20)])
    rr_ip = cl.hosts["rr"].address
    del cl.models["rr"]  # BIRD is not a podnet node: the nodes know it as a global BGP peer
    bird = Bird(netns_bed, cl.hosts["rr"], rr_ip, AS, tmp_path / "bird")
    bird.configure([BirdPeer(cl.models[n].address, AS, rr_client=True) for n in "abc"])
    peer = m.BGPPeer(name="bird-rr", peer_ip=rr_ip, as_number=AS, hold_time=3, accept_routes=True)
    with speakers(cl, "abc", NO_MESH) as sp:
        for name, s in sp.items():
            peers = plan_peers(name, cl.models, NO_MESH, [peer], FAST)
            assert [(p.address, p.kind) for p in peers] == [(rr_ip, "global")]  # no mesh: only the reflector
            s.set_peers(peers)
            s.announce([BLOCKS[name]])

        def learned() -> bool:
            for name, s in sp.items():
                best = s.best_routes()
                if set(best) != {BLOCKS[o] for o in "abc" if o != name}:
                    return False
            return True

        wait(learned, 20, "each node learns the other nodes' blocks through BIRD")
        for name, s in sp.items():
            assert established(s)
            for other in "abc":
                if other == name:
                    continue
                route = s.best_routes()[BLOCKS[other]]
                origin = cl.models[other].address
                assert route.peer == rr_ip
                assert route.next_hop == origin  # reflected routes keep the originator's next hop
                assert route.originator_id == origin
                assert route.cluster_list == ("10.10.10.10",)
        assert set(bird.routes()) == {BLOCKS[n] for n in "abc"}


def test_podnet_node_reflects_for_podnet_and_gobgp_clients(netns_bed: NetnsBed, tmp_path: Path) -> None:
    cl = make_cluster(netns_bed, [("a", 11), ("b", 12), ("c", 13), ("g", 14), ("rr", 20)], rr=["rr"])
    g_ip, rr_ip = cl.hosts["g"].address, cl.hosts["rr"].address
    gobgp = GoBGP(netns_bed, cl.hosts["g"], g_ip, AS, tmp_path / "gobgp")
    gobgp.start([rr_ip])
    with speakers(cl, ["rr", "a", "b", "c"], NO_MESH) as sp:
        for name, s in sp.items():
            peers = plan_peers(name, cl.models, NO_MESH, (), FAST)
            if name == "rr":
                assert {(p.address, p.kind) for p in peers} == {
                    (cl.models[n].address, "route reflector client") for n in "abcg"
                }
            else:
                assert [(p.address, p.kind) for p in peers] == [(rr_ip, "route reflector")]
            s.set_peers(peers)
            s.announce([BLOCKS[name]] if name in BLOCKS else ["10.244.20.0/26"])
        wait(lambda: "Establ" in gobgp.neighbor_states(), 20, "GoBGP session with the podnet reflector")
        gobgp.add_route(BLOCKS["g"])

        everyone = set(BLOCKS.values()) | {"10.244.20.0/26"}

        def learned() -> bool:
            for name in "abc":
                if set(sp[name].best_routes()) != everyone - {BLOCKS[name]}:
                    return False
            return set(gobgp.rib()) == everyone

        wait(learned, 20, "every client learns every other client's block and the reflector's own")
        for name in "abc":
            best = sp[name].best_routes()
            for other in "abcg":
                if other == name:
                    continue
                route = best[BLOCKS[other]]
                origin = cl.hosts[other].address
                assert (route.peer, route.next_hop, route.originator_id, route.cluster_list) == (
                    rr_ip,
                    origin,
                    origin,
                    ("1.0.0.1",),
                ), f"{name} sees {other}'s block as {route}"
            own = best["10.244.20.0/26"]  # the reflector's own block: no reflection attributes
            assert (own.next_hop, own.originator_id, own.cluster_list) == (rr_ip, None, ())
        rib = gobgp.rib()
        for other in "abc":
            path = rib[BLOCKS[other]]
            origin = cl.hosts[other].address
            assert path["next_hop"] == origin
            assert path["originator_id"] == origin
            assert path["cluster_list"] == ["1.0.0.1"]
        # never back to the originator: the reflector sent nobody their own block
        sent = sp["rr"].sent_routes()
        for name in "abcg":
            assert BLOCKS[name] not in sent[cl.hosts[name].address]

        # a withdrawal at a client is reflected too
        sp["a"].announce([])
        wait(lambda: BLOCKS["a"] not in gobgp.rib() and BLOCKS["a"] not in sp["b"].best_routes(), 5, "withdrawal")
