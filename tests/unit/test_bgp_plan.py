"""The pure BGP plan: sessions per node (mesh, reflectors, configured peers, errors) and announcements."""

from __future__ import annotations

from bgp.plan import (
    GLOBAL,
    MESH,
    NODE_SPECIFIC,
    REFLECTOR,
    RR_CLIENT,
    Defaults,
    identity,
    peer_config_errors,
    plan_announcements,
    plan_peers,
)
from datastore import model as m

CFG = m.ClusterConfig()


def nodes(*specs: tuple[str, int, str | None]) -> dict[str, m.Node]:
    return {n: m.Node(name=n, ip=f"192.168.77.{h}/24", rr_cluster_id=rr) for n, h, rr in specs}


def test_full_mesh_one_session_per_pair_lower_address_passive() -> None:
    ns = nodes(("a", 11, None), ("b", 12, None), ("c", 9, None))
    a = plan_peers("a", ns, CFG)
    assert [(p.address, p.kind, p.passive) for p in a] == [
        ("192.168.77.9", MESH, False),
        ("192.168.77.12", MESH, True),
    ]
    b = {p.address: p.passive for p in plan_peers("b", ns, CFG)}
    assert b["192.168.77.11"] is False  # exactly one side of a-b waits
    assert all(p.as_number == 64512 and p.in_cluster and p.accept_routes for p in a)


def test_addresses_compare_numerically_not_as_text() -> None:
    ns = nodes(("a", 9, None), ("b", 10, None))
    assert plan_peers("a", ns, CFG)[0].passive is True  # .9 < .10 although "9" > "1" as text


def test_route_reflector_mode() -> None:
    ns = nodes(("rr1", 2, "1.0.0.1"), ("rr2", 3, "1.0.0.1"), ("a", 11, None), ("b", 12, None))
    cfg = m.ClusterConfig(node_mesh=False)
    assert [(p.address, p.kind) for p in plan_peers("a", ns, cfg)] == [
        ("192.168.77.2", REFLECTOR),
        ("192.168.77.3", REFLECTOR),
    ]
    rr1 = {p.address: (p.kind, p.rr_client) for p in plan_peers("rr1", ns, cfg)}
    assert rr1 == {
        "192.168.77.3": (REFLECTOR, False),
        "192.168.77.11": (RR_CLIENT, True),
        "192.168.77.12": (RR_CLIENT, True),
    }
    assert identity(ns["rr1"], cfg).cluster_id == "1.0.0.1"


def test_mesh_off_without_reflectors_means_no_node_sessions() -> None:
    ns = nodes(("a", 11, None), ("b", 12, None))
    assert plan_peers("a", ns, m.ClusterConfig(node_mesh=False)) == []


def test_per_node_as_and_timers() -> None:
    ns = nodes(("a", 11, None), ("b", 12, None))
    ns["b"] = m.Node(name="b", ip="192.168.77.12/24", as_number=65001)
    [b] = plan_peers("a", ns, CFG, defaults=Defaults(hold_time=3, graceful_restart_time=0))
    assert (b.as_number, b.hold_time, b.graceful_restart_time) == (65001, 3, 0)
    assert identity(ns["b"], CFG).as_number == 65001


def test_global_and_node_specific_peers() -> None:
    ns = nodes(("a", 11, None), ("b", 12, None))
    peers = [
        m.BGPPeer(name="tor", peer_ip="192.168.77.1", as_number=65000, password="pw", hold_time=9),
        m.BGPPeer(name="only-b", peer_ip="192.168.77.50", as_number=65000, node="b"),
    ]
    a = {p.address: p for p in plan_peers("a", ns, CFG, peers)}
    assert set(a) == {"192.168.77.1", "192.168.77.12"}
    tor = a["192.168.77.1"]
    assert (tor.kind, tor.password, tor.hold_time, tor.in_cluster, tor.accept_routes) == (GLOBAL, "pw", 9, False, False)
    b = {p.address: p.kind for p in plan_peers("b", ns, CFG, peers)}
    assert b["192.168.77.50"] == NODE_SPECIFIC


def test_invalid_peers_carry_a_reason_and_do_not_disturb_others() -> None:
    ns = nodes(("a", 11, None), ("b", 12, None))
    peers = [
        m.BGPPeer(name="me", peer_ip="192.168.77.11", as_number=65000),
        m.BGPPeer(name="dup-node", peer_ip="192.168.77.12", as_number=65000),
        m.BGPPeer(name="v6", peer_ip="fd00::1", as_number=65000),
        m.BGPPeer(name="tor", peer_ip="192.168.77.1", as_number=65000),
        m.BGPPeer(name="tor-again", peer_ip="192.168.77.1", as_number=65001),
        m.BGPPeer(name="ghost", peer_ip="192.168.77.60", as_number=65000, node="nope"),
    ]
    out = plan_peers("a", ns, CFG, peers)
    ok = [(p.address, p.kind) for p in out if p.ok]
    assert ok == [("192.168.77.1", GLOBAL), ("192.168.77.12", MESH)]
    errors = {p.name: p.error for p in out if not p.ok}
    assert set(errors) == {"me", "dup-node", "v6", "tor-again"}
    assert "own address" in (errors["me"] or "")
    assert "already peers" in (errors["dup-node"] or "")
    assert "address family" in (errors["v6"] or "")
    assert "'tor'" in (errors["tor-again"] or "")
    assert peer_config_errors(peers, ns) == {"ghost": "node 'nope' does not exist"}


def test_node_sharing_our_address_is_an_error_not_a_session() -> None:
    ns = nodes(("a", 11, None), ("b", 12, None))
    ns["twin"] = m.Node(name="twin", ip="192.168.77.11/24")
    out = plan_peers("a", ns, CFG)
    assert [p.address for p in out if p.ok] == ["192.168.77.12"]
    assert [p.name for p in out if not p.ok] == ["twin"]


def test_announcements_blocks_and_borrowed_addresses() -> None:
    blocks = {
        "10.244.1.0/26": m.Block(cidr="10.244.1.0/26", affinity="node:a"),
        "10.244.2.0/26": m.Block(cidr="10.244.2.0/26", affinity="node:b"),
        "10.244.3.0/26": m.Block(cidr="10.244.3.0/26"),
    }
    affinities = {
        ("a", "10.244.4.0/26"): m.Affinity(node="a", cidr="10.244.4.0/26", state="confirmed"),
        ("a", "10.244.5.0/26"): m.Affinity(node="a", cidr="10.244.5.0/26", state="pending"),
    }
    eps = [
        m.Endpoint("a", "ns", "p1", "eth0", "cali1", ("10.244.1.5/32",)),  # in a's own block: covered
        m.Endpoint("a", "ns", "p2", "eth0", "cali2", ("10.244.2.7/32",)),  # borrowed from b's block
        m.Endpoint("a", "ns", "p3", "eth0", "cali3", ("10.244.3.1/32",)),  # from an unaffine block
        m.Endpoint("b", "ns", "p4", "eth0", "cali4", ("10.244.2.9/32",)),  # another node's pod
        m.Endpoint("a", "ns", "p5", "eth0", "cali5", ("172.16.0.1/32",)),  # outside every block
    ]
    ns = {"a": m.Node(name="a", ip="192.168.77.11/24", vxlan_address="10.244.2.60")}
    got = plan_announcements("a", blocks, affinities, eps, ns)
    assert got == {
        "10.244.1.0/26",
        "10.244.4.0/26",
        "10.244.2.7/32",
        "10.244.3.1/32",
        "10.244.2.60/32",
    }
    assert plan_announcements("b", blocks, affinities, eps) == {"10.244.2.0/26"}
    assert plan_announcements("c", blocks, affinities, eps) == frozenset()


def test_malformed_peer_records_are_named_with_their_reason() -> None:
    from bgp.plan import malformed_peer_errors
    from datastore import keys

    malformed = {
        keys.BGPPeerKey("tor").path: "asNumber: must be at most 4294967295",
        keys.BGPPeerKey("md5").path: "password: must be 1..80 bytes (TCP-MD5 key limit)",
        keys.NodeKey("a").path: "ip: required",
        "/elsewhere/x": "not ours",
    }
    assert malformed_peer_errors(malformed) == {
        "tor": "asNumber: must be at most 4294967295",
        "md5": "password: must be 1..80 bytes (TCP-MD5 key limit)",
    }


def test_announcements_are_ipv4_only() -> None:
    blocks = {"fd00:244::/122": m.Block(cidr="fd00:244::/122", affinity="node:a")}
    eps = [m.Endpoint("a", "ns", "p", "eth0", "cali1", ("fd00:245::5/128",))]
    assert plan_announcements("a", blocks, {}, eps) == frozenset()
