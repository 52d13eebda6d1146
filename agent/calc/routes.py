"""Desired routes and tunnel devices for one node, as a pure function of a snapshot and the best learned routes.

Remote destinations come only from BGP (a block nobody announces is not routed: a dead node's blocks disappear when
its routes are withdrawn); the datastore supplies what BGP does not carry: each pool's encapsulation, the nodes'
underlay subnets and VTEP addresses, this node's own blocks and pods. No I/O, no clock.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from agent.calc.snapshot import Snapshot
from bgp.rib import LearnedRoute
from datastore import model as m

VXLAN_DEVICE = "vxlan.podnet"
IPIP_DEVICE = "tunl0"
# Encapsulation overheads the device MTUs leave for: outer IPv4 + UDP + VXLAN + inner Ethernet, and outer IPv4.
VXLAN_OVERHEAD = 50
IPIP_OVERHEAD = 20

ROUTE_TYPES = m.ROUTE_TYPES


@dataclass(frozen=True)
class Route:
    """One route in the main table. ``dev`` None lets the kernel pick the device from the next hop."""

    cidr: str
    type: str  # one of ROUTE_TYPES
    blackhole: bool = False
    via: str | None = None
    dev: str | None = None
    onlink: bool = False
    encapsulation: str = "none"
    learned_from: str | None = None

    def status(self, node: str) -> m.RouteStatus:
        return m.RouteStatus(
            node=node,
            cidr=self.cidr,
            type=self.type,
            via=self.via,
            dev=self.dev,
            encapsulation=self.encapsulation,
            learned_from=self.learned_from,
        )


@dataclass(frozen=True)
class VxlanDevice:
    vni: int
    port: int
    mac: str
    local_ip: str  # this node's underlay address: the tunnel's source, and how the writer finds the parent link
    address: str | None = None  # this node's VXLAN tunnel address from IPAM (assigned as a /32)


@dataclass(frozen=True)
class VxlanPeer:
    """A remote VTEP: a static FDB entry (mac → node_ip) and a permanent neighbour (next_hop → mac)."""

    node: str
    node_ip: str
    mac: str
    next_hop: str


@dataclass(frozen=True)
class IpipDevice:
    local_ip: str  # this node's underlay address (the writer sizes the MTU from the link holding it)
    address: str | None = None  # this node's tunnel address from IPAM (assigned as a /32)


@dataclass(frozen=True)
class RoutePlan:
    routes: dict[str, Route] = field(default_factory=dict)  # cidr ->
    vxlan: VxlanDevice | None = None
    vxlan_peers: tuple[VxlanPeer, ...] = ()
    ipip: IpipDevice | None = None
    problems: tuple[str, ...] = ()  # why something could not be planned, for logs and status


def vtep_mac(node: m.Node) -> str:
    """The node's VTEP MAC: the one in its record, else one derived from its name (locally administered, unicast),
    so every node computes the same MAC for a record that has none."""
    if node.vxlan_mac:
        return node.vxlan_mac
    raw = bytearray(hashlib.sha1(f"podnet-vtep:{node.name}".encode()).digest()[:6])
    raw[0] = (raw[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in raw)


def best_routes(learned: Iterable[LearnedRoute]) -> dict[str, LearnedRoute]:
    """One path per prefix: highest local preference, then shortest AS path, then lowest next hop (deterministic)."""
    best: dict[str, LearnedRoute] = {}

    def rank(r: LearnedRoute) -> tuple[int, int, int]:
        return (-(r.local_pref if r.local_pref is not None else 100), len(r.as_path), int(_addr(r.next_hop)))

    for r in learned:
        cidr = str(ipaddress.ip_network(r.prefix, strict=False))
        cur = best.get(cidr)
        if cur is None or rank(r) < rank(cur):
            best[cidr] = r
    return best


def _addr(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(ip)


def _net(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(cidr, strict=False)


def _pool_of(pools: Iterable[m.IPPool], cidr: str) -> m.IPPool | None:
    """The most specific pool containing ``cidr`` (disabled pools too: their existing blocks still route)."""
    net = _net(cidr)
    found: m.IPPool | None = None
    for pool in pools:
        pnet = _net(pool.cidr)
        inside = net.version == pnet.version and net.subnet_of(pnet)  # type: ignore[arg-type]
        if inside and (found is None or pnet.prefixlen > _net(found.cidr).prefixlen):
            found = pool
    return found


def plan_routes(snap: Snapshot, node_name: str, learned: Iterable[LearnedRoute]) -> RoutePlan:
    me = snap.nodes.get(node_name)
    problems: list[str] = []
    routes: dict[str, Route] = {}
    peers: dict[str, VxlanPeer] = {}
    pools = list(snap.pools.values())

    # The same set the speaker announces (bgp.plan.plan_announcements): by the block's affinity, or a confirmed
    # affinity record whose block is not written yet.
    local_blocks = sorted(
        {b.cidr for b in snap.blocks.values() if b.affine_node == node_name}
        | {cidr for (n, cidr), a in snap.affinities.items() if n == node_name and a.state == "confirmed"}
    )
    for cidr in local_blocks:
        routes[cidr] = Route(cidr=cidr, type="local-block", blackhole=True)
    for ep in snap.local_endpoints(node_name):
        for ip in ep.ips:
            cidr = str(_net(ip))
            routes[cidr] = Route(cidr=cidr, type="local-pod", dev=ep.host_iface)

    if me is None:
        problems.append(f"node {node_name!r} has no node record: remote routes need its address and subnet")
    nodes_by_ip = {n.address: n for n in snap.nodes.values()}
    need_vxlan = any(p.encapsulation == "vxlan" for p in pools)
    my_subnet = ipaddress.ip_interface(me.ip).network if me is not None else None

    for cidr, lr in sorted(best_routes(learned).items()):
        if cidr in routes:
            continue  # ours (a local block or pod) wins over anything announced for it
        if me is not None and lr.next_hop == me.address:
            continue  # our own announcement reflected back to us
        pool = _pool_of(pools, cidr)
        if pool is None:
            if lr.peer in nodes_by_ip:
                # podnet nodes announce pool addresses only: anything else from one is a misconfiguration
                problems.append(f"{cidr} from node {nodes_by_ip[lr.peer].name}: not inside any IP pool, not programmed")
            else:
                # Only peers configured with acceptRoutes get their routes into the RIB (bgp.outbound.accepts):
                # the operator asked for them, so they are used like any router's route.
                routes[cidr] = Route(cidr=cidr, type="external", via=lr.next_hop, learned_from=lr.peer)
            continue
        kind = "remote-block" if cidr in snap.blocks or _net(cidr).prefixlen < _net(cidr).max_prefixlen else "borrowed"
        hop_node = nodes_by_ip.get(lr.next_hop)
        encap = pool.encapsulation
        if encap != "none" and hop_node is None:
            encap = "none"  # a next hop that is not a podnet node has no tunnel endpoint: route to it directly
        if encap != "none" and pool.cross_subnet and my_subnet is not None and _addr(lr.next_hop) in my_subnet:
            encap = "none"
        if encap == "vxlan":
            assert hop_node is not None
            if me is None:
                continue  # reported above
            peer = VxlanPeer(
                node=hop_node.name,
                node_ip=hop_node.address,
                mac=vtep_mac(hop_node),
                next_hop=hop_node.vxlan_address or hop_node.address,
            )
            peers[peer.next_hop] = peer
            routes[cidr] = Route(
                cidr=cidr,
                type=kind,
                via=peer.next_hop,
                dev=VXLAN_DEVICE,
                onlink=True,
                encapsulation="vxlan",
                learned_from=lr.peer,
            )
        elif encap == "ipip":
            routes[cidr] = Route(
                cidr=cidr,
                type=kind,
                via=lr.next_hop,
                dev=IPIP_DEVICE,
                onlink=True,
                encapsulation="ipip",
                learned_from=lr.peer,
            )
        else:
            routes[cidr] = Route(cidr=cidr, type=kind, via=lr.next_hop, learned_from=lr.peer)

    vxlan = None
    if need_vxlan and me is not None:
        vxlan = VxlanDevice(
            vni=snap.config.vxlan_vni,
            port=snap.config.vxlan_port,
            mac=vtep_mac(me),
            local_ip=me.address,
            address=me.vxlan_address,
        )
    ipip = None
    if any(p.encapsulation == "ipip" for p in pools) and me is not None:
        ipip = IpipDevice(local_ip=me.address, address=me.tunnel_address)
    return RoutePlan(
        routes=routes,
        vxlan=vxlan,
        vxlan_peers=tuple(sorted(peers.values(), key=lambda p: p.next_hop)),
        ipip=ipip,
        problems=tuple(problems),
    )
