"""What the agent does on a node, composed from the agent's own modules, for the VM-tier tests (no tests here).

Each step is the real code path: the datastore cache's snapshot, the pure route and policy calculations, and the
kernel writers (pyroute2 links and routes, iptables-restore and ipset), pointed at a node's network namespace.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from agent.cache import Cache
from agent.calc.policy import compile_node
from agent.calc.routes import RoutePlan, plan_routes
from agent.calc.snapshot import Snapshot
from agent.dataplane.cmd import CommandRunner
from agent.dataplane.links import LinkWriter
from agent.dataplane.netlink import Netlink
from agent.dataplane.programmer import PolicyDataplane
from agent.dataplane.routes import RouteWriter
from bgp.rib import LearnedRoute
from datastore.etcd import EtcdClient
from testbed.netns import NodeNs


def snapshot(client: EtcdClient) -> Snapshot:
    """An in-sync snapshot of the datastore, through the agent's cache (snapshot-then-watch)."""
    cache = Cache(client).start()
    try:
        assert cache.in_sync.wait(30), "the agent cache never got in sync with etcd"
        snap = cache.snapshot()
    finally:
        cache.stop()
    assert snap.in_sync
    return snap


def program_routes(snap: Snapshot, node: NodeNs, learned: Iterable[LearnedRoute]) -> RoutePlan:
    """Plan this node's devices and routes and write them (devices first: routes name tunl0)."""
    plan = plan_routes(snap, node.name, learned)
    nl = Netlink(node.ns.name)
    try:
        problems = LinkWriter(nl).apply(plan, in_sync=True).problems
        assert problems == [], problems
        result = RouteWriter(nl).apply(plan.routes, in_sync=True)
        assert result.failed == {}, result.failed
    finally:
        nl.close()
    return plan


def program_policy(snap: Snapshot, node: NodeNs) -> None:
    """Compile NetworkPolicy for this node and write its chains and ipsets."""
    result = compile_node(snap, node.name)
    assert result.rejected == [], result.rejected
    PolicyDataplane(CommandRunner(node.ns.name)).apply(result.state, full=True, delete_stale=True)


def podnet_routes(node: NodeNs) -> list[str]:
    """The node's main-table routes with podnet's proto, as ``ip route`` prints them."""
    return [line.strip() for line in node.ns.ip("route", "show", "proto", "80").splitlines()]


def tunl0(node: NodeNs) -> dict[str, object]:
    """``ip -d -s link show tunl0`` as JSON, plus its IPv4 addresses under "addrs"."""
    link: dict[str, object] = json.loads(node.ns.ip("-j", "-d", "-s", "link", "show", "dev", "tunl0"))[0]
    addrs = json.loads(node.ns.ip("-j", "-4", "addr", "show", "dev", "tunl0"))
    link["addrs"] = sorted(f"{a['local']}/{a['prefixlen']}" for x in addrs for a in x.get("addr_info", []))
    return link


def tunl0_packets(node: NodeNs) -> tuple[int, int]:
    """(rx, tx) packet counters of the node's tunl0."""
    stats = tunl0(node)["stats64"]
    assert isinstance(stats, dict)
    return int(stats["rx"]["packets"]), int(stats["tx"]["packets"])
