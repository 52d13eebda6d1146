"""The pure route calculation: snapshot + this node + learned routes → routes, VXLAN peers, devices."""

from __future__ import annotations

from dataclasses import replace

from agent.calc.routes import (
    IPIP_DEVICE,
    VXLAN_DEVICE,
    IpipDevice,
    Route,
    VxlanPeer,
    best_routes,
    plan_routes,
    vtep_mac,
)
from agent.calc.snapshot import Snapshot
from bgp.rib import LearnedRoute
from datastore import model as m

N1 = m.Node("n1", "192.168.77.11/24", vxlan_address="10.244.0.1", vxlan_mac="02:00:00:00:00:01")
N2 = m.Node("n2", "192.168.77.12/24", vxlan_address="10.244.0.65", vxlan_mac="02:00:00:00:00:02")
N3 = m.Node("n3", "192.168.88.13/24")  # another subnet, no VXLAN address or MAC in its record


def snap(encapsulation: str = "vxlan", cross_subnet: bool = False, **extra: object) -> Snapshot:
    pool = m.IPPool("10.244.0.0/16", encapsulation=encapsulation, cross_subnet=cross_subnet)
    blocks = {
        "10.244.1.0/26": m.Block("10.244.1.0/26", affinity="node:n1"),
        "10.244.2.0/26": m.Block("10.244.2.0/26", affinity="node:n2"),
        "10.244.3.0/26": m.Block("10.244.3.0/26", affinity="node:n3"),
    }
    base = Snapshot(
        in_sync=True,
        pools={pool.cidr: pool},
        blocks=blocks,
        nodes={n.name: n for n in (N1, N2, N3)},
    )
    return replace(base, **extra)  # type: ignore[arg-type]


LEARNED = [
    LearnedRoute("10.244.2.0/26", "192.168.77.12", "192.168.77.12"),
    LearnedRoute("10.244.3.0/26", "192.168.88.13", "192.168.77.12"),  # reflected by n2
]


def test_local_blocks_are_blackholed_and_local_pods_get_a_link_route() -> None:
    ep = m.Endpoint("n1", "nsa", "a", "eth0", "cali0123456789a", ips=("10.244.1.5/32",))
    other = m.Endpoint("n2", "nsa", "b", "eth0", "cali0123456789b", ips=("10.244.2.5/32",))
    plan = plan_routes(snap(endpoints={("n1", "nsa", "a", "eth0"): ep, ("n2", "nsa", "b", "eth0"): other}), "n1", [])
    assert plan.routes == {
        "10.244.1.0/26": Route("10.244.1.0/26", "local-block", blackhole=True),
        "10.244.1.5/32": Route("10.244.1.5/32", "local-pod", dev="cali0123456789a"),
    }


def test_encapsulation_none_routes_via_the_announcing_node() -> None:
    plan = plan_routes(snap("none"), "n1", LEARNED)
    assert plan.routes["10.244.2.0/26"] == Route(
        "10.244.2.0/26", "remote-block", via="192.168.77.12", learned_from="192.168.77.12"
    )
    assert plan.routes["10.244.3.0/26"].via == "192.168.88.13"
    assert plan.routes["10.244.3.0/26"].learned_from == "192.168.77.12"
    assert plan.vxlan is None and plan.ipip is None and plan.vxlan_peers == ()


def test_vxlan_routes_through_the_device_with_fdb_and_neighbour_per_remote_vtep() -> None:
    plan = plan_routes(snap("vxlan"), "n1", LEARNED)
    assert plan.routes["10.244.2.0/26"] == Route(
        "10.244.2.0/26",
        "remote-block",
        via="10.244.0.65",  # the remote VTEP's tunnel address
        dev=VXLAN_DEVICE,
        onlink=True,
        encapsulation="vxlan",
        learned_from="192.168.77.12",
    )
    # n3's record has no VXLAN address or MAC: its node IP is the next hop and its MAC is derived from its name.
    r3 = plan.routes["10.244.3.0/26"]
    assert (r3.via, r3.dev, r3.encapsulation) == ("192.168.88.13", VXLAN_DEVICE, "vxlan")
    assert plan.vxlan_peers == (
        VxlanPeer("n2", "192.168.77.12", "02:00:00:00:00:02", "10.244.0.65"),
        VxlanPeer("n3", "192.168.88.13", vtep_mac(N3), "192.168.88.13"),
    )
    assert plan.vxlan is not None
    assert (plan.vxlan.vni, plan.vxlan.port, plan.vxlan.mac, plan.vxlan.local_ip, plan.vxlan.address) == (
        4096,
        4789,
        "02:00:00:00:00:01",
        "192.168.77.11",
        "10.244.0.1",
    )


def test_cross_subnet_encapsulates_only_off_subnet_next_hops() -> None:
    plan = plan_routes(snap("vxlan", cross_subnet=True), "n1", LEARNED)
    assert plan.routes["10.244.2.0/26"].encapsulation == "none"
    assert plan.routes["10.244.2.0/26"].dev is None
    assert plan.routes["10.244.2.0/26"].via == "192.168.77.12"
    assert plan.routes["10.244.3.0/26"].encapsulation == "vxlan"
    assert [p.node for p in plan.vxlan_peers] == ["n3"]


def test_ipip_routes_onlink_through_tunl0() -> None:
    me = m.Node("n1", "192.168.77.11/24", tunnel_address="10.244.1.1")
    plan = plan_routes(snap("ipip", nodes={"n1": me, "n2": N2, "n3": N3}), "n1", LEARNED)
    assert plan.routes["10.244.2.0/26"] == Route(
        "10.244.2.0/26",
        "remote-block",
        via="192.168.77.12",
        dev=IPIP_DEVICE,
        onlink=True,
        encapsulation="ipip",
        learned_from="192.168.77.12",
    )
    assert plan.ipip == IpipDevice(local_ip="192.168.77.11", address="10.244.1.1")
    assert plan.vxlan is None


def test_a_host_route_borrowed_from_our_own_block_is_routed_to_its_holder() -> None:
    learned = [LearnedRoute("10.244.1.9/32", "192.168.77.12", "192.168.77.12")]
    plan = plan_routes(snap("none"), "n1", learned)
    assert plan.routes["10.244.1.0/26"].blackhole
    assert plan.routes["10.244.1.9/32"] == Route(
        "10.244.1.9/32", "borrowed", via="192.168.77.12", learned_from="192.168.77.12"
    )


def test_our_own_prefixes_announced_back_are_ignored() -> None:
    ep = m.Endpoint("n1", "nsa", "a", "eth0", "cali0123456789a", ips=("10.244.1.5/32",))
    learned = [
        LearnedRoute("10.244.1.0/26", "192.168.77.12", "192.168.77.12"),  # someone claims our block
        LearnedRoute("10.244.1.5/32", "192.168.77.12", "192.168.77.12"),  # and our pod
        LearnedRoute("10.244.4.0/26", "192.168.77.11", "192.168.77.12"),  # our own route, reflected
    ]
    plan = plan_routes(snap("none", endpoints={("n1", "nsa", "a", "eth0"): ep}), "n1", learned)
    assert plan.routes["10.244.1.0/26"].type == "local-block"
    assert plan.routes["10.244.1.5/32"].type == "local-pod"
    assert "10.244.4.0/26" not in plan.routes


def test_prefixes_outside_every_pool_from_a_node_are_reported_not_programmed() -> None:
    plan = plan_routes(snap("none"), "n1", [LearnedRoute("198.51.100.0/24", "192.168.77.12", "192.168.77.12")])
    assert "198.51.100.0/24" not in plan.routes
    assert any("198.51.100.0/24" in p and "node n2" in p and "pool" in p for p in plan.problems)


def test_prefixes_outside_every_pool_accepted_from_a_configured_peer_are_routed_via_its_next_hop() -> None:
    # Only a peer with acceptRoutes gets routes into the RIB; in a VXLAN pool cluster they are still plain routes.
    learned = [
        LearnedRoute("198.51.100.0/24", "192.168.77.1", "192.168.77.1", as_path=(64600,)),
        LearnedRoute("10.244.1.0/26", "192.168.77.1", "192.168.77.1", as_path=(64600,)),  # our own block: ours wins
    ]
    plan = plan_routes(snap("vxlan"), "n1", learned)
    assert plan.routes["198.51.100.0/24"] == Route(
        "198.51.100.0/24", "external", via="192.168.77.1", learned_from="192.168.77.1"
    )
    assert plan.routes["10.244.1.0/26"].type == "local-block"
    assert not plan.problems
    assert plan.routes["198.51.100.0/24"].status("n1").type == "external"


def test_a_next_hop_that_is_not_a_node_is_routed_directly_even_in_a_vxlan_pool() -> None:
    plan = plan_routes(snap("vxlan"), "n1", [LearnedRoute("10.244.9.0/26", "192.168.77.1", "192.168.77.1")])
    assert plan.routes["10.244.9.0/26"] == Route(
        "10.244.9.0/26", "remote-block", via="192.168.77.1", learned_from="192.168.77.1"
    )


def test_without_our_node_record_only_local_and_unencapsulated_routes_are_planned() -> None:
    s = snap("vxlan", nodes={"n2": N2})
    plan = plan_routes(s, "n1", LEARNED)
    assert plan.routes == {"10.244.1.0/26": Route("10.244.1.0/26", "local-block", blackhole=True)} | {
        "10.244.3.0/26": Route("10.244.3.0/26", "remote-block", via="192.168.88.13", learned_from="192.168.77.12")
    }
    assert plan.vxlan is None
    assert any("no node record" in p for p in plan.problems)


def test_best_path_prefers_local_pref_then_as_path_then_lowest_next_hop() -> None:
    a = LearnedRoute("10.244.2.0/26", "192.168.77.13", "x", as_path=(1, 2))
    b = LearnedRoute("10.244.2.0/26", "192.168.77.12", "y", as_path=(1, 2))
    c = LearnedRoute("10.244.2.0/26", "192.168.77.14", "z", as_path=(1,))
    d = LearnedRoute("10.244.2.0/26", "192.168.77.15", "w", as_path=(1, 2, 3), local_pref=200)
    assert best_routes([a, b])["10.244.2.0/26"] is b
    assert best_routes([a, b, c])["10.244.2.0/26"] is c
    assert best_routes([a, b, c, d])["10.244.2.0/26"] is d


def test_derived_vtep_mac_is_stable_locally_administered_unicast() -> None:
    mac = vtep_mac(N3)
    assert mac == vtep_mac(m.Node("n3", "10.0.0.1/8"))
    assert mac != vtep_mac(m.Node("n4", "192.168.88.13/24"))
    first = int(mac.split(":")[0], 16)
    assert first & 0x02 and not first & 0x01
    assert vtep_mac(N1) == "02:00:00:00:00:01"


def test_status_records_what_was_planned() -> None:
    r = plan_routes(snap("vxlan"), "n1", LEARNED).routes["10.244.2.0/26"]
    st = r.status("n1")
    assert st == m.RouteStatus(
        "n1", "10.244.2.0/26", "remote-block", "10.244.0.65", VXLAN_DEVICE, "vxlan", "192.168.77.12"
    )


def test_a_confirmed_affinity_makes_a_local_block_before_its_block_record_exists() -> None:
    affs = {
        ("n1", "10.244.5.0/26"): m.Affinity("n1", "10.244.5.0/26", "confirmed"),
        ("n1", "10.244.6.0/26"): m.Affinity("n1", "10.244.6.0/26", "pending"),
    }
    plan = plan_routes(snap("none", affinities=affs), "n1", [])
    assert sorted(c for c, r in plan.routes.items() if r.type == "local-block") == ["10.244.1.0/26", "10.244.5.0/26"]
