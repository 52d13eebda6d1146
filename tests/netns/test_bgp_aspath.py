"""AS_PATH across podnet speakers, checked in other implementations' RIBs: (a) multi-AS paths (a sequence, and a
sequence with an AS_SET) that BIRD 2 and GoBGP clients announce reach every other client of a podnet route
reflector intact; (b) a node refuses, and counts, routes an external peer re-announces with the node's own AS on
the path (RFC 4271 9.1.2), while accepting the peer's other routes with their path intact."""

from __future__ import annotations

from pathlib import Path

import pytest

from bgp.plan import plan_peers
from datastore import model as m
from testbed.netns import NetnsBed
from tests.netns.test_bgp_support import AS, FAST, Bird, BirdPeer, GoBGP, make_cluster, speakers, wait

pytestmark = pytest.mark.netns

NO_MESH = m.ClusterConfig(node_mesh=False)
FROM_BIRD = "198.51.100.0/24"  # BIRD prepends 64600 65010 65011
FROM_GOBGP = "203.0.113.0/24"  # GoBGP announces 65020 {65021,65022}


def test_multi_as_paths_are_reflected_intact(netns_bed: NetnsBed, tmp_path: Path) -> None:
    cl = make_cluster(netns_bed, [("c", 13), ("b", 14), ("g", 15), ("rr", 20)], rr=["rr"])
    rr_ip, b_ip, g_ip = cl.hosts["rr"].address, cl.hosts["b"].address, cl.hosts["g"].address
    # BIRD and GoBGP are nodes in the datastore (the reflector's clients) that run their own BGP daemons
    bird = Bird(netns_bed, cl.hosts["b"], b_ip, AS, tmp_path / "bird")
    bird.configure([BirdPeer(rr_ip, AS)], static=[FROM_BIRD], paths={FROM_BIRD: (64600, 65010, 65011)})
    gobgp = GoBGP(netns_bed, cl.hosts["g"], g_ip, AS, tmp_path / "gobgp")
    gobgp.start([rr_ip])
    with speakers(cl, ["rr", "c"], NO_MESH) as sp:
        for name, s in sp.items():
            s.set_peers(plan_peers(name, cl.models, NO_MESH, (), FAST))
        wait(lambda: "Establ" in gobgp.neighbor_states(), 20, "GoBGP session with the reflector")
        gobgp.add_route(FROM_GOBGP, "aspath", "65020,{65021,65022}")

        wait(lambda: {FROM_BIRD, FROM_GOBGP} <= set(sp["c"].best_routes()), 20, "the podnet client learns both")
        wait(lambda: FROM_BIRD in gobgp.rib() and FROM_GOBGP in bird.routes(), 20, "each daemon learns the other's")

        best = sp["c"].best_routes()
        assert best[FROM_BIRD].as_path == (64600, 65010, 65011)
        assert best[FROM_GOBGP].as_path == (65020, (65021, 65022))
        assert (best[FROM_BIRD].originator_id, best[FROM_BIRD].cluster_list) == (b_ip, ("1.0.0.1",))
        # what GoBGP received from the podnet reflector: one AS_SEQUENCE (segment type 2), no AS 0
        assert gobgp.rib()[FROM_BIRD]["as_path"] == [(2, [64600, 65010, 65011])]
        # what BIRD received: the sequence and the set
        assert bird.routes()[FROM_GOBGP]["as_path"] == "65020 {65021 65022}"
        assert bird.routes()[FROM_GOBGP]["next_hop"] == g_ip  # (unresolved: this BIRD has no IGP routes)


def test_a_path_with_our_own_as_is_refused_and_counted(netns_bed: NetnsBed, tmp_path: Path) -> None:
    cl = make_cluster(netns_bed, [("a", 11), ("b", 12), ("x", 30)])
    x_ip = cl.hosts["x"].address
    del cl.models["x"]  # an external router, AS 64600
    addr = {n: cl.models[n].address for n in "ab"}
    bird = Bird(netns_bed, cl.hosts["x"], x_ip, 64600, tmp_path / "bird")
    b_block = "10.244.2.0/26"
    bird.configure(
        [BirdPeer(addr[n], AS) for n in "ab"],
        static=[FROM_BIRD, b_block],
        # b's block comes back from outside with our AS on the path: 64600 64512
        paths={FROM_BIRD: (65010, 65011), b_block: (AS,)},
    )
    x = m.BGPPeer(name="x", peer_ip=x_ip, as_number=64600, hold_time=3, graceful_restart_time=0, accept_routes=True)
    with speakers(cl, "ab") as sp:
        for name, s in sp.items():
            s.set_peers(plan_peers(name, cl.models, m.ClusterConfig(), [x], FAST))
        sp["a"].announce(["10.244.1.0/26"])
        sp["b"].announce([b_block])
        wait(lambda: all(FROM_BIRD in s.best_routes() for s in sp.values()), 20, "both learn BIRD's own route")
        for s in sp.values():
            route = s.best_routes()[FROM_BIRD]
            assert (route.peer, route.next_hop, route.as_path) == (x_ip, x_ip, (64600, 65010, 65011))
        # counted per announcement received (b has had it twice: BIRD re-sends when its best path changes)
        wait(lambda: all(s.rejected_as_loop >= 1 for s in sp.values()), 10, "the looped route refused by both")
        for name, s in sp.items():
            [x_status] = [p for p in s.peer_status() if p.address == x_ip]
            assert x_status.prefixes_received == 1, f"{name} keeps a route with its own AS on the path"
            assert set(s.rejected_routes()) == {"as-loop"} and set(s.rejected_routes()["as-loop"]) == {x_ip}
        # a reaches b's block through b itself, never through the outside
        wait(lambda: b_block in sp["a"].best_routes(), 20, "a learns b's block from b")
        assert (sp["a"].best_routes()[b_block].peer, sp["a"].best_routes()[b_block].as_path) == (addr["b"], ())
