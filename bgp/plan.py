"""What one node's BGP speaker should do, as a pure function of datastore models: its identity (router ID, AS,
reflector cluster), its peers (full mesh, route reflection, global and node-specific peers) and the prefixes it
announces (its affine blocks, and /32s of addresses it borrowed from other nodes' blocks). No I/O.

A configured peer that cannot be used (its address is this node's own, it duplicates another session, its AS is
not usable) does not stop the others: it is returned with ``error`` set, and the speaker reports it without
opening a session.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from datastore import keys
from datastore import model as m

MESH = "node-to-node mesh"
REFLECTOR = "route reflector"  # the peer reflects for us (we are its client, or both of us reflect)
RR_CLIENT = "route reflector client"  # we reflect for the peer
GLOBAL = "global"
NODE_SPECIFIC = "node specific"


@dataclass(frozen=True)
class Defaults:
    """Timers for sessions between podnet nodes (configured peers carry their own)."""

    hold_time: int = 90
    graceful_restart_time: int = 120


@dataclass(frozen=True)
class PeerSpec:
    """One BGP session this node should have (or, with ``error`` set, would have had)."""

    address: str
    as_number: int
    kind: str  # MESH | REFLECTOR | RR_CLIENT | GLOBAL | NODE_SPECIFIC
    name: str = ""  # the podnet node or the BGPPeer record it comes from
    passive: bool = False  # wait for the peer to connect (one session per pair of podnet nodes)
    password: str | None = None
    hold_time: int = 90
    graceful_restart_time: int = 120
    rr_client: bool = False  # we reflect routes to and from this peer as its reflector
    in_cluster: bool = True  # a podnet node: its routes are accepted and (when we reflect) reflected
    accept_routes: bool = True  # routes learned from this peer reach the RIB
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class SpeakerIdentity:
    node: str
    router_id: str
    as_number: int
    local_address: str
    cluster_id: str | None = None  # set when this node is a route reflector


def identity(node: m.Node, cluster: m.ClusterConfig) -> SpeakerIdentity:
    return SpeakerIdentity(
        node=node.name,
        router_id=node.address,
        as_number=node.as_number or cluster.as_number,
        local_address=node.address,
        cluster_id=node.rr_cluster_id,
    )


def _ip_key(address: str) -> tuple[int, int]:
    ip = ipaddress.ip_address(address)
    return (ip.version, int(ip))


def plan_peers(
    node: str,
    nodes: Mapping[str, m.Node],
    cluster: m.ClusterConfig,
    bgp_peers: Iterable[m.BGPPeer] = (),
    defaults: Defaults = Defaults(),
) -> list[PeerSpec]:
    """The sessions ``node`` should have, sorted by address. Raises KeyError if ``node`` is not in ``nodes``."""
    me = nodes[node]
    my_ip = me.address
    my_key = _ip_key(my_ip)
    out: dict[str, PeerSpec] = {}
    errors: list[PeerSpec] = []
    # Node.address parses the record's interface string: once per node, not once per use (this runs every pass).
    address = {n.name: n.address for n in nodes.values()}

    def node_peer(other: m.Node, kind: str, rr_client: bool) -> PeerSpec:
        other_ip = address[other.name]
        return PeerSpec(
            address=other_ip,
            as_number=other.as_number or cluster.as_number,
            kind=kind,
            name=other.name,
            passive=my_key < _ip_key(other_ip),  # the lower address waits, the higher connects
            hold_time=defaults.hold_time,
            graceful_restart_time=defaults.graceful_restart_time,
            rr_client=rr_client,
        )

    others = [n for name, n in sorted(nodes.items()) if name != node]
    for other in others:
        if address[other.name] == my_ip:
            errors.append(PeerSpec(my_ip, cluster.as_number, MESH, other.name, error="node has this node's address"))
    others = [n for n in others if address[n.name] != my_ip]
    if cluster.node_mesh:
        for other in others:
            out[address[other.name]] = node_peer(other, MESH, rr_client=False)
    elif me.rr_cluster_id is not None:
        for other in others:
            if other.rr_cluster_id is None:
                out[address[other.name]] = node_peer(other, RR_CLIENT, rr_client=True)
            else:
                # Reflectors peer with each other as non-clients: each reflects its clients' routes to them.
                out[address[other.name]] = node_peer(other, REFLECTOR, rr_client=False)
    else:
        for other in others:
            if other.rr_cluster_id is not None:
                out[address[other.name]] = node_peer(other, REFLECTOR, rr_client=False)

    node_ips = set(address.values())
    for peer in sorted(bgp_peers, key=lambda p: p.name):
        if peer.node is not None and peer.node != node:
            continue
        kind = GLOBAL if peer.node is None else NODE_SPECIFIC
        spec = PeerSpec(
            address=str(ipaddress.ip_address(peer.peer_ip)),
            as_number=peer.as_number,
            kind=kind,
            name=peer.name,
            password=peer.password,
            hold_time=peer.hold_time,
            graceful_restart_time=peer.graceful_restart_time,
            in_cluster=False,
            accept_routes=peer.accept_routes,
        )
        reason = _configured_peer_error(spec, my_ip, node_ips, out)
        if reason is not None:
            errors.append(_with_error(spec, reason))
            continue
        out[spec.address] = spec
    result = sorted(out.values(), key=lambda p: _ip_key(p.address))
    return result + errors


def _configured_peer_error(
    spec: PeerSpec, my_ip: str, node_ips: set[str], planned: Mapping[str, PeerSpec]
) -> str | None:
    if spec.address == my_ip:
        return f"peer address {spec.address} is this node's own address"
    if ipaddress.ip_address(spec.address).version != ipaddress.ip_address(my_ip).version:
        return f"peer address {spec.address} is not of this node's address family"
    if spec.address in node_ips and spec.address in planned and planned[spec.address].in_cluster:
        return f"peer address {spec.address} is a podnet node this node already peers with"
    if spec.address in planned:
        return f"peer {planned[spec.address].name!r} already configures a session with {spec.address}"
    return None


def _with_error(spec: PeerSpec, reason: str) -> PeerSpec:
    return PeerSpec(
        address=spec.address,
        as_number=spec.as_number,
        kind=spec.kind,
        name=spec.name,
        in_cluster=spec.in_cluster,
        error=reason,
    )


def peer_config_errors(bgp_peers: Iterable[m.BGPPeer], nodes: Mapping[str, m.Node]) -> dict[str, str]:
    """Configuration problems no single node's plan sees, by BGPPeer name (e.g. a peer naming an unknown node)."""
    errors: dict[str, str] = {}
    for peer in bgp_peers:
        if peer.node is not None and peer.node not in nodes:
            errors[peer.name] = f"node {peer.node!r} does not exist"
    return errors


def malformed_peer_errors(malformed: Mapping[str, str]) -> dict[str, str]:
    """BGPPeer records the datastore refused to decode (bad AS number, bad peer address, over-long password…), by
    peer name, from a watcher's ``malformed`` map (key -> reason): so status can list them with their reason."""
    out: dict[str, str] = {}
    for path, reason in malformed.items():
        try:
            key = keys.parse_key(path)
        except keys.InvalidKey:
            continue
        if isinstance(key, keys.BGPPeerKey):
            out[key.name] = reason
    return out


def plan_announcements(
    node: str,
    blocks: Mapping[str, m.Block],
    affinities: Mapping[tuple[str, str], m.Affinity],
    endpoints: Iterable[m.Endpoint],
    nodes: Mapping[str, m.Node] | None = None,
) -> frozenset[str]:
    """The prefixes ``node`` announces: every block affine to it (by the block's affinity or a confirmed affinity
    record), plus a /32 for each address in use on this node that lies in a block not affine to it. IPv4 only,
    as the speaker carries IPv4 unicast only."""
    mine: set[str] = set()
    for cidr, block in blocks.items():
        if block.affine_node == node:
            mine.add(cidr)
    for (aff_node, cidr), aff in affinities.items():
        if aff_node == node and aff.state == "confirmed":
            mine.add(cidr)
    own_nets = [ipaddress.ip_network(c) for c in mine]
    all_nets = [ipaddress.ip_network(c) for c in blocks]

    addresses: list[str] = []
    for ep in endpoints:
        if ep.node == node:
            addresses.extend(str(ipaddress.ip_interface(ip).ip) for ip in ep.ips)
    me = (nodes or {}).get(node)
    if me is not None:
        addresses.extend(a for a in (me.tunnel_address, me.vxlan_address) if a is not None)

    out = {c for c in mine if ipaddress.ip_network(c).version == 4}  # the speaker carries IPv4 unicast only
    for address in addresses:
        ip = ipaddress.ip_address(address)
        if any(ip in net for net in own_nets):
            continue
        if ip.version == 4 and any(ip in net for net in all_nets):  # borrowed: in another node's or no node's block
            out.add(str(ipaddress.ip_network(ip)))
    return frozenset(out)
