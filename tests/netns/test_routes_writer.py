"""The route and device writers against the real kernel, fed with hand-made learned routes (no BGP here)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace

import pytest

from agent.calc.routes import VXLAN_DEVICE, RoutePlan, plan_routes
from agent.calc.snapshot import Snapshot
from agent.dataplane.links import LinkWriter
from agent.dataplane.netlink import Netlink
from agent.dataplane.routes import RouteWriter
from bgp.rib import LearnedRoute
from datastore import model as m
from testbed.netns import NetnsBed, NodeNs

pytestmark = pytest.mark.netns

BLOCKS = {"n1": "10.244.1.0/26", "n2": "10.244.2.0/26"}


def snapshot(bed_nodes: list[NodeNs], encapsulation: str) -> Snapshot:
    ippool = m.IPPool("10.244.0.0/16", encapsulation=encapsulation)
    nodes = {n.name: m.Node(n.name, n.ip, vxlan_address=f"10.244.0.{i + 1}") for i, n in enumerate(bed_nodes)}
    blocks = {cidr: m.Block(cidr, affinity=f"node:{name}") for name, cidr in BLOCKS.items()}
    return Snapshot(in_sync=True, pools={ippool.cidr: ippool}, nodes=nodes, blocks=blocks)


def learned_for(me: str, bed_nodes: list[NodeNs]) -> list[LearnedRoute]:
    return [LearnedRoute(BLOCKS[n.name], n.address, n.address) for n in bed_nodes if n.name != me]


@contextlib.contextmanager
def writers(node: NodeNs) -> Iterator[tuple[LinkWriter, RouteWriter]]:
    nl = Netlink(node.ns.name)
    try:
        yield LinkWriter(nl), RouteWriter(nl)
    finally:
        nl.close()


def program(node: NodeNs, plan: RoutePlan, in_sync: bool = True) -> None:
    with writers(node) as (links, routes):
        assert links.apply(plan, in_sync).problems == []
        result = routes.apply(plan.routes, in_sync)
        assert result.failed == {}


def podnet_routes(node: NodeNs) -> list[str]:
    return [line.strip() for line in node.ns.ip("route", "show", "proto", "80").splitlines()]


def tx_packets(node: NodeNs, dev: str) -> int:
    out = node.ns.ip("-s", "-o", "link", "show", dev)
    # "... TX: bytes packets errors ... \    <bytes> <packets> ..." (one line with -o)
    fields = out.split("TX:")[1].split("\\")[1].split()
    return int(fields[1])


@pytest.mark.parametrize("encapsulation", ["vxlan", "none"])
def test_pods_on_two_nodes_reach_each_other_through_programmed_routes(netns_bed: NetnsBed, encapsulation: str) -> None:
    ul = netns_bed.underlay()
    n1, n2 = netns_bed.node("n1", ul, 11), netns_bed.node("n2", ul, 12)
    a = netns_bed.pod(n1, "nsa", "a", "10.244.1.2")
    b = netns_bed.pod(n2, "nsa", "b", "10.244.2.2")
    snap = snapshot([n1, n2], encapsulation)
    ep_a = m.Endpoint("n1", "nsa", "a", "eth0", a.host_iface, ips=("10.244.1.2/32",))
    snap = replace(snap, endpoints={("n1", "nsa", "a", "eth0"): ep_a})
    assert not a.ns.ping(b.ip, timeout=0.5)  # nothing routes pods yet
    for node in (n1, n2):
        program(node, plan_routes(snap, node.name, learned_for(node.name, [n1, n2])))

    r1 = podnet_routes(n1)
    assert "blackhole 10.244.1.0/26" in r1
    assert f"10.244.1.2 dev {a.host_iface} scope link" in r1  # the pod route, adopted from the CNI-made one
    if encapsulation == "vxlan":
        assert "10.244.2.0/26 via 10.244.0.2 dev vxlan.podnet onlink" in r1
        assert "mtu 1450" in n1.ns.ip("link", "show", VXLAN_DEVICE)
        neigh = n1.ns.ip("neigh", "show", "dev", VXLAN_DEVICE)
        assert "10.244.0.2 lladdr" in neigh and "PERMANENT" in neigh
        assert f"dst {n2.address}" in n1.ns.run("bridge", "fdb", "show", "dev", VXLAN_DEVICE).stdout
    else:
        assert f"10.244.2.0/26 via {n2.address} dev eth0" in r1
        assert n1.ns.ip("link", "show", VXLAN_DEVICE, check=False) == ""

    before = tx_packets(n1, VXLAN_DEVICE) if encapsulation == "vxlan" else 0
    assert a.ns.ping(b.ip)
    b.ns.listen("tcp", 8080)
    assert a.ns.connect("tcp", b.ip, 8080)
    if encapsulation == "vxlan":
        assert tx_packets(n1, VXLAN_DEVICE) > before  # the traffic really went through the tunnel


def test_stale_routes_go_only_after_in_sync_and_foreign_routes_are_never_touched(netns_bed: NetnsBed) -> None:
    ul = netns_bed.underlay()
    n1, n2 = netns_bed.node("n1", ul, 11), netns_bed.node("n2", ul, 12)
    snap = snapshot([n1, n2], "none")
    full = plan_routes(snap, "n1", learned_for("n1", [n1, n2]))
    program(n1, full)
    n1.ns.ip("route", "add", "10.244.7.0/26", "via", n2.address, "proto", "static")  # an operator's route
    n1.ns.ip("route", "add", "blackhole", "10.244.8.0/26", "proto", "80")  # ours, no longer wanted
    local_only = plan_routes(snap, "n1", [])

    with writers(n1) as (_, routes):
        kept = routes.apply(local_only.routes, in_sync=False)
        assert kept.removed == []
        assert "10.244.2.0/26 via 192.168.77.12 dev eth0" in podnet_routes(n1)
        assert "blackhole 10.244.8.0/26" in podnet_routes(n1)

        # The datastore is in sync but BGP is not yet (a restart): our stale blackhole goes, learned routes stay.
        early = routes.apply(local_only.routes, in_sync=True, learned_in_sync=False)
        assert early.removed == ["10.244.8.0/26"]
        assert "10.244.2.0/26 via 192.168.77.12 dev eth0" in podnet_routes(n1)

        done = routes.apply(local_only.routes, in_sync=True)
        assert done.removed == ["10.244.2.0/26"]
        assert podnet_routes(n1) == ["blackhole 10.244.1.0/26"]
        assert "10.244.7.0/26 via 192.168.77.12 dev eth0 proto static" in n1.ns.ip("route", "show")

        # A learned route to where a foreign route already is: reported, and the foreign route is unchanged.
        clash = plan_routes(snap, "n1", [LearnedRoute("10.244.7.0/26", n2.address, n2.address)])
        res = routes.apply(clash.routes, in_sync=True)
        assert "not made by podnet" in res.failed["10.244.7.0/26"]
        assert "10.244.7.0/26 via 192.168.77.12 dev eth0 proto static" in n1.ns.ip("route", "show")

        # A second pass with nothing changed writes nothing.
        assert routes.apply(local_only.routes, in_sync=True).changed == 0


def test_a_stale_pod_route_is_kept_for_the_grace_period(netns_bed: NetnsBed) -> None:
    ul = netns_bed.underlay()
    n1 = netns_bed.node("n1", ul, 11)
    pod = netns_bed.pod(n1, "nsa", "a", "10.244.1.2")
    n1.ns.ip("route", "replace", "10.244.1.2/32", "dev", pod.host_iface, "proto", "80")  # as the CNI writes it
    now = [100.0]
    nl = Netlink(n1.ns.name)
    try:
        routes = RouteWriter(nl, pod_grace=30.0, clock=lambda: now[0])
        assert routes.apply({}, in_sync=True).removed == []  # its endpoint has not reached us yet
        now[0] += 29.0
        assert routes.apply({}, in_sync=True).removed == []
        now[0] += 2.0
        assert routes.apply({}, in_sync=True).removed == ["10.244.1.2/32"]
    finally:
        nl.close()
    assert podnet_routes(n1) == []


def test_vxlan_device_is_repaired_and_recreated(netns_bed: NetnsBed) -> None:
    ul = netns_bed.underlay(mtu=9000)
    n1, n2 = netns_bed.node("n1", ul, 11, mtu=9000), netns_bed.node("n2", ul, 12, mtu=9000)
    snap = snapshot([n1, n2], "vxlan")
    plan = plan_routes(snap, "n1", learned_for("n1", [n1, n2]))
    program(n1, plan)
    assert "mtu 8950" in n1.ns.ip("link", "show", VXLAN_DEVICE)  # host MTU - 50

    # Down (which flushes its neighbours and the routes through it) with a wrong MTU: repaired in place.
    n1.ns.ip("link", "set", VXLAN_DEVICE, "mtu", "1300", "down")
    assert "vxlan.podnet" not in " ".join(podnet_routes(n1))
    program(n1, plan)
    link = n1.ns.ip("-d", "link", "show", VXLAN_DEVICE)
    assert "mtu 8950" in link and ",UP" in link
    assert "10.244.0.2 lladdr" in n1.ns.ip("neigh", "show", "dev", VXLAN_DEVICE)
    assert "10.244.2.0/26 via 10.244.0.2 dev vxlan.podnet onlink" in podnet_routes(n1)

    # Wrong VNI: the kernel cannot change it in place, so the device is recreated (routes through it with it).
    n1.ns.ip("link", "del", VXLAN_DEVICE)
    n1.ns.ip("link", "add", VXLAN_DEVICE, "type", "vxlan", "id", "77", "dstport", "4789", "dev", "eth0")
    program(n1, plan)
    assert "vxlan id 4096" in n1.ns.ip("-d", "link", "show", VXLAN_DEVICE)
    assert "10.244.2.0/26 via 10.244.0.2 dev vxlan.podnet onlink" in podnet_routes(n1)
    assert "inet 10.244.0.1/32" in n1.ns.ip("addr", "show", "dev", VXLAN_DEVICE)

    # No VXLAN pool any more: once in sync the device goes (with its routes).
    none_plan = plan_routes(snapshot([n1, n2], "none"), "n1", learned_for("n1", [n1, n2]))
    program(n1, none_plan)
    assert n1.ns.ip("link", "show", VXLAN_DEVICE, check=False) == ""
    assert "10.244.2.0/26 via 192.168.77.12 dev eth0" in podnet_routes(n1)


@pytest.mark.needs_ipip
def test_ipip_routes_through_tunl0(netns_bed: NetnsBed) -> None:
    # Skipped by tests/conftest.py where the kernel has no IPIP (never probed here: loading the module would make a
    # tunl0 in the machine's own namespace); the VM tier runs it.
    ul = netns_bed.underlay()
    n1, n2 = netns_bed.node("n1", ul, 11), netns_bed.node("n2", ul, 12)
    a = netns_bed.pod(n1, "nsa", "a", "10.244.1.2")
    b = netns_bed.pod(n2, "nsa", "b", "10.244.2.2")
    ippool = m.IPPool("10.244.0.0/16", encapsulation="ipip")
    nodes = {
        "n1": m.Node("n1", n1.ip, tunnel_address="10.244.1.1"),
        "n2": m.Node("n2", n2.ip, tunnel_address="10.244.2.1"),
    }
    blocks = {cidr: m.Block(cidr, affinity=f"node:{name}") for name, cidr in BLOCKS.items()}
    snap = Snapshot(in_sync=True, pools={ippool.cidr: ippool}, nodes=nodes, blocks=blocks)
    for node in (n1, n2):
        program(node, plan_routes(snap, node.name, learned_for(node.name, [n1, n2])))
    assert f"10.244.2.0/26 via {n2.address} dev tunl0 onlink" in podnet_routes(n1)
    tunl = n1.ns.ip("addr", "show", "dev", "tunl0")
    assert "mtu 1480" in tunl and "inet 10.244.1.1/32" in tunl
    assert a.ns.ping(b.ip)
    b.ns.listen("tcp", 8080)
    assert a.ns.connect("tcp", b.ip, 8080)


def test_passes_without_verify_work_from_the_model_and_verifying_passes_repair(netns_bed: NetnsBed) -> None:
    ul = netns_bed.underlay()
    n1, n2 = netns_bed.node("n1", ul, 11), netns_bed.node("n2", ul, 12)
    snap = snapshot([n1, n2], "vxlan")
    plan = plan_routes(snap, "n1", learned_for("n1", [n1, n2]))
    nl = Netlink(n1.ns.name)
    try:
        links, routes = LinkWriter(nl), RouteWriter(nl)
        assert not links.apply(plan, True).problems
        assert not routes.apply(plan.routes, True).failed
        # Someone removes our route and neighbour behind our back.
        n1.ns.ip("route", "del", "10.244.2.0/26", "proto", "80")
        n1.ns.ip("neigh", "del", "10.244.0.2", "dev", VXLAN_DEVICE)
        # An event-driven pass trusts its model: it writes only what the plan changed (here: a new remote block).
        more = plan_routes(
            snap, "n1", [*learned_for("n1", [n1, n2]), LearnedRoute("10.244.5.0/26", n2.address, n2.address)]
        )
        assert not links.apply(more, True, verify=False).problems
        fast = routes.apply(more.routes, True, verify=False)
        assert fast.changed == 1 and not fast.failed
        assert fast.programmed["10.244.5.0/26"].dev == VXLAN_DEVICE
        assert "10.244.5.0/26 via 10.244.0.2 dev vxlan.podnet onlink" in podnet_routes(n1)
        assert "10.244.2.0/26 via 10.244.0.2 dev vxlan.podnet onlink" not in podnet_routes(n1)
        # A withdrawal on the fast path is removed at once.
        assert routes.apply(plan.routes, True, verify=False).removed == ["10.244.5.0/26"]
        # The periodic verifying pass puts back what was taken.
        assert not links.apply(plan, True).problems
        assert routes.apply(plan.routes, True).changed == 1
        assert "10.244.2.0/26 via 10.244.0.2 dev vxlan.podnet onlink" in podnet_routes(n1)
        assert "10.244.0.2 lladdr" in n1.ns.ip("neigh", "show", "dev", VXLAN_DEVICE)
        # Direct routes: the device the kernel chose is reported on the fast path too.
        direct = plan_routes(snapshot([n1, n2], "none"), "n1", learned_for("n1", [n1, n2]))
        links.apply(direct, True, verify=False)
        done = routes.apply(direct.routes, True, verify=False)
        assert done.programmed["10.244.2.0/26"].dev == "eth0"
        assert f"10.244.2.0/26 via {n2.address} dev eth0" in podnet_routes(n1)
    finally:
        nl.close()
