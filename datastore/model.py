"""Frozen, typed values stored under podnet's keys, with validation. Pure: no I/O.

Every class has ``from_json(dict)`` (raises ``ModelError`` with the field at fault) and ``to_json() -> dict``.
JSON field names are camelCase, as Kubernetes and Calico operators expect when they read keys with etcdctl.
Identity that lives in the key (a pod's namespace and name, a block's CIDR) is carried in the value too where the
value is useful on its own, and ``datastore.codec`` checks the two agree.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from datastore import fields as f
from datastore.fields import JsonObject, ModelError

__all__ = [
    "Affinity",
    "AgentStatus",
    "Allocation",
    "BGPPeer",
    "BGPPeerStatus",
    "Block",
    "ClusterConfig",
    "Endpoint",
    "Handle",
    "IPPool",
    "ModelError",
    "NamedPort",
    "Namespace",
    "Node",
    "Pod",
    "Policy",
    "RouteStatus",
]

ENCAPSULATIONS = ("ipip", "vxlan", "none")
MAX_AS = 4294967295
# TCP-MD5 keys are at most 80 bytes (RFC 2385 as implemented by Linux TCP_MD5SIG_MAXKEYLEN).
MAX_MD5_PASSWORD = 80


def _as_number(d: JsonObject, name: str, default: int | None = None) -> int:
    return f.integer(d, name, default, lo=1, hi=MAX_AS)


@dataclass(frozen=True)
class ClusterConfig:
    as_number: int = 64512
    node_mesh: bool = True
    encapsulation: str = "vxlan"
    vxlan_vni: int = 4096
    vxlan_port: int = 4789
    strict_affinity: bool = False
    log_level: str = "info"

    @classmethod
    def from_json(cls, d: JsonObject) -> ClusterConfig:
        return cls(
            as_number=_as_number(d, "asNumber", 64512),
            node_mesh=f.boolean(d, "nodeToNodeMesh", True),
            encapsulation=f.choice(d, "encapsulation", ENCAPSULATIONS, "vxlan"),
            vxlan_vni=f.integer(d, "vxlanVNI", 4096, lo=1, hi=(1 << 24) - 1),
            vxlan_port=f.integer(d, "vxlanPort", 4789, lo=1, hi=65535),
            strict_affinity=f.boolean(d, "strictAffinity", False),
            log_level=f.choice(d, "logLevel", ("debug", "info", "warning", "error"), "info"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "asNumber": self.as_number,
            "nodeToNodeMesh": self.node_mesh,
            "encapsulation": self.encapsulation,
            "vxlanVNI": self.vxlan_vni,
            "vxlanPort": self.vxlan_port,
            "strictAffinity": self.strict_affinity,
            "logLevel": self.log_level,
        }


@dataclass(frozen=True)
class BGPPeer:
    """A configured BGP peer: global (``node`` empty: every node peers) or node-specific."""

    name: str
    peer_ip: str
    as_number: int
    node: str | None = None
    password: str | None = None
    hold_time: int = 90
    graceful_restart_time: int = 120
    accept_routes: bool = False  # put the routes this peer announces into the nodes' RIBs (else ignore them)

    @classmethod
    def from_json(cls, d: JsonObject) -> BGPPeer:
        password = f.opt_string(d, "password")
        if password is not None and not 0 < len(password.encode()) <= MAX_MD5_PASSWORD:
            raise ModelError(f"password: must be 1..{MAX_MD5_PASSWORD} bytes (TCP-MD5 key limit)")
        hold = f.integer(d, "holdTime", 90, lo=0, hi=65535)
        if 0 < hold < 3:
            raise ModelError("holdTime: must be 0 or at least 3 seconds (RFC 4271)")
        return cls(
            name=f.string(d, "name"),
            peer_ip=f.ip(f.string(d, "peerIP"), "peerIP"),
            as_number=_as_number(d, "asNumber"),
            node=f.opt_string(d, "node"),
            password=password,
            hold_time=hold,
            graceful_restart_time=f.integer(d, "gracefulRestartTime", 120, lo=0, hi=4095),
            accept_routes=f.boolean(d, "acceptRoutes", False),
        )

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "peerIP": self.peer_ip,
            "asNumber": self.as_number,
            "holdTime": self.hold_time,
            "gracefulRestartTime": self.graceful_restart_time,
            "acceptRoutes": self.accept_routes,
        }
        if self.node is not None:
            d["node"] = self.node
        if self.password is not None:
            d["password"] = self.password
        return d


@dataclass(frozen=True)
class IPPool:
    cidr: str
    block_size: int = 26
    encapsulation: str = "vxlan"
    cross_subnet: bool = False
    nat_outgoing: bool = False
    disabled: bool = False
    node_selector: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        net = ipaddress.ip_network(self.cidr)
        if not net.prefixlen <= self.block_size <= net.max_prefixlen:
            raise ModelError(
                f"blockSize: /{self.block_size} must lie between the pool's /{net.prefixlen} and /{net.max_prefixlen}"
            )

    @classmethod
    def from_json(cls, d: JsonObject) -> IPPool:
        return cls(
            cidr=f.cidr(f.string(d, "cidr"), "cidr"),
            block_size=f.integer(d, "blockSize", 26, lo=0, hi=128),
            encapsulation=f.choice(d, "encapsulation", ENCAPSULATIONS, "vxlan"),
            cross_subnet=f.boolean(d, "crossSubnet"),
            nat_outgoing=f.boolean(d, "natOutgoing"),
            disabled=f.boolean(d, "disabled"),
            node_selector=f.labels(d, "nodeSelector"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "cidr": self.cidr,
            "blockSize": self.block_size,
            "encapsulation": self.encapsulation,
            "crossSubnet": self.cross_subnet,
            "natOutgoing": self.nat_outgoing,
            "disabled": self.disabled,
            "nodeSelector": dict(self.node_selector),
        }


@dataclass(frozen=True)
class Allocation:
    """One allocated address of a block: who holds it (handle) and what for."""

    handle: str
    pod: str | None = None  # "<namespace>/<name>", or None for a tunnel address
    kind: str = "pod"  # "pod" | "tunnel"

    @classmethod
    def from_json(cls, d: JsonObject) -> Allocation:
        return cls(
            handle=f.string(d, "handle"),
            pod=f.opt_string(d, "pod"),
            kind=f.choice(d, "kind", ("pod", "tunnel"), "pod"),
        )

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"handle": self.handle, "kind": self.kind}
        if self.pod is not None:
            d["pod"] = self.pod
        return d


@dataclass(frozen=True)
class Block:
    """An IPAM block. ``allocations`` maps an address's ordinal within the block to its holder."""

    cidr: str
    affinity: str | None = None  # "node:<name>" while a node holds the block's affinity
    allocations: dict[int, Allocation] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(ipaddress.ip_network(self.cidr).num_addresses)

    @property
    def affine_node(self) -> str | None:
        if self.affinity and self.affinity.startswith("node:"):
            return self.affinity[len("node:") :]
        return None

    def address(self, ordinal: int) -> str:
        return str(ipaddress.ip_network(self.cidr).network_address + ordinal)

    @classmethod
    def from_json(cls, d: JsonObject) -> Block:
        cidr = f.cidr(f.string(d, "cidr"), "cidr")
        size = ipaddress.ip_network(cidr).num_addresses
        raw = f.obj(d.get("allocations") or {}, "allocations")
        allocations: dict[int, Allocation] = {}
        for k, v in raw.items():
            if not k.isdigit() or int(k) >= size:
                raise ModelError(f"allocations: ordinal {k!r} is outside the block {cidr}")
            allocations[int(k)] = Allocation.from_json(f.obj(v, f"allocations[{k}]"))
        affinity = f.opt_string(d, "affinity")
        if affinity is not None and not affinity.startswith("node:"):
            raise ModelError(f"affinity: {affinity!r} must be 'node:<name>'")
        return cls(cidr=cidr, affinity=affinity, allocations=allocations)

    def to_json(self) -> dict[str, Any]:
        return {
            "cidr": self.cidr,
            "affinity": self.affinity,
            "allocations": {str(k): v.to_json() for k, v in sorted(self.allocations.items())},
        }


@dataclass(frozen=True)
class Affinity:
    node: str
    cidr: str
    state: str = "confirmed"  # "pending" | "confirmed" | "pendingDeletion"

    @classmethod
    def from_json(cls, d: JsonObject) -> Affinity:
        return cls(
            node=f.string(d, "node"),
            cidr=f.cidr(f.string(d, "cidr"), "cidr"),
            state=f.choice(d, "state", ("pending", "confirmed", "pendingDeletion"), "confirmed"),
        )

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "cidr": self.cidr, "state": self.state}


@dataclass(frozen=True)
class Handle:
    """The addresses one holder (a pod's network attachment, a node's tunnel) has."""

    handle: str
    ips: tuple[str, ...] = ()
    pod: str | None = None
    node: str | None = None

    @classmethod
    def from_json(cls, d: JsonObject) -> Handle:
        return cls(
            handle=f.string(d, "handle"),
            ips=tuple(f.ip(x, "ips") for x in f.string_list(d, "ips")),
            pod=f.opt_string(d, "pod"),
            node=f.opt_string(d, "node"),
        )

    def to_json(self) -> dict[str, Any]:
        return {"handle": self.handle, "ips": list(self.ips), "pod": self.pod, "node": self.node}


@dataclass(frozen=True)
class Node:
    name: str
    ip: str  # underlay address with prefix, e.g. 192.168.77.11/24
    as_number: int | None = None
    rr_cluster_id: str | None = None
    tunnel_address: str | None = None  # tunl0 (IPIP) address from IPAM
    vxlan_address: str | None = None  # vxlan.podnet address from IPAM
    vxlan_mac: str | None = None
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return str(ipaddress.ip_interface(self.ip).ip)

    @classmethod
    def from_json(cls, d: JsonObject) -> Node:
        rr = f.opt_string(d, "routeReflectorClusterID")
        if rr is not None:
            f.ip(rr, "routeReflectorClusterID")  # a cluster ID is written as a dotted quad
        tunnel = f.opt_string(d, "tunnelAddress")
        vxlan = f.opt_string(d, "vxlanAddress")
        mac = f.opt_string(d, "vxlanMAC")
        if mac is not None and not _is_mac(mac):
            raise ModelError(f"vxlanMAC: {mac!r} is not a MAC address")
        as_raw = f.opt_integer(d, "asNumber", lo=1, hi=MAX_AS)
        return cls(
            name=f.string(d, "name"),
            ip=f.interface(f.string(d, "ip"), "ip"),
            as_number=as_raw,
            rr_cluster_id=rr,
            tunnel_address=None if tunnel is None else f.ip(tunnel, "tunnelAddress"),
            vxlan_address=None if vxlan is None else f.ip(vxlan, "vxlanAddress"),
            vxlan_mac=None if mac is None else mac.lower(),
            labels=f.labels(d, "labels"),
        )

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "ip": self.ip, "labels": dict(self.labels)}
        for key, value in (
            ("asNumber", self.as_number),
            ("routeReflectorClusterID", self.rr_cluster_id),
            ("tunnelAddress", self.tunnel_address),
            ("vxlanAddress", self.vxlan_address),
            ("vxlanMAC", self.vxlan_mac),
        ):
            if value is not None:
                d[key] = value
        return d


def _is_mac(value: str) -> bool:
    parts = value.split(":")
    return len(parts) == 6 and all(len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p) for p in parts)


PROTOCOLS = ("TCP", "UDP", "SCTP")


@dataclass(frozen=True)
class NamedPort:
    name: str
    port: int
    protocol: str = "TCP"

    @classmethod
    def from_json(cls, d: JsonObject) -> NamedPort:
        return cls(
            name=f.string(d, "name"),
            port=f.integer(d, "port", lo=1, hi=65535),
            protocol=f.choice(d, "protocol", PROTOCOLS, "TCP"),
        )

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "port": self.port, "protocol": self.protocol}


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    ips: tuple[str, ...] = ()
    node: str | None = None
    named_ports: tuple[NamedPort, ...] = ()

    @classmethod
    def from_json(cls, d: JsonObject) -> Pod:
        return cls(
            namespace=f.string(d, "namespace"),
            name=f.string(d, "name"),
            labels=f.labels(d, "labels"),
            ips=tuple(f.ip(x, "ips") for x in f.string_list(d, "ips")),
            node=f.opt_string(d, "node"),
            named_ports=tuple(NamedPort.from_json(x) for x in f.obj_list(d, "namedPorts")),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "name": self.name,
            "labels": dict(self.labels),
            "ips": list(self.ips),
            "node": self.node,
            "namedPorts": [p.to_json() for p in self.named_ports],
        }


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: JsonObject) -> Namespace:
        return cls(name=f.string(d, "name"), labels=f.labels(d, "labels"))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "labels": dict(self.labels)}


@dataclass(frozen=True)
class Policy:
    """A Kubernetes NetworkPolicy as stored (networking.k8s.io/v1 object). The spec is validated by the policy
    compiler, which reports and skips an invalid policy; here only its envelope is checked."""

    namespace: str
    name: str
    spec: JsonObject = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: JsonObject) -> Policy:
        meta = f.obj(d.get("metadata"), "metadata")
        return cls(
            namespace=f.string(meta, "namespace", "default"),
            name=f.string(meta, "name"),
            spec=f.obj(d.get("spec", {}), "spec"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"namespace": self.namespace, "name": self.name},
            "spec": self.spec,
        }


@dataclass(frozen=True)
class Endpoint:
    """A workload endpoint: one network attachment of a pod on a node."""

    node: str
    namespace: str
    pod: str
    iface: str  # the pod-side interface name, e.g. eth0
    host_iface: str  # the host-side veth, e.g. cali1234567890a
    ips: tuple[str, ...] = ()  # CIDRs, e.g. 10.244.1.5/32
    mac: str | None = None
    container_id: str | None = None
    handle: str | None = None

    @classmethod
    def from_json(cls, d: JsonObject) -> Endpoint:
        return cls(
            node=f.string(d, "node"),
            namespace=f.string(d, "namespace"),
            pod=f.string(d, "pod"),
            iface=f.string(d, "iface"),
            host_iface=f.string(d, "hostIface"),
            ips=tuple(f.interface(x, "ips") for x in f.string_list(d, "ips")),
            mac=f.opt_string(d, "mac"),
            container_id=f.opt_string(d, "containerID"),
            handle=f.opt_string(d, "handle"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "namespace": self.namespace,
            "pod": self.pod,
            "iface": self.iface,
            "hostIface": self.host_iface,
            "ips": list(self.ips),
            "mac": self.mac,
            "containerID": self.container_id,
            "handle": self.handle,
        }


# What a programmed route is for; "external": a prefix outside every pool accepted from a configured peer.
ROUTE_TYPES = ("remote-block", "local-block", "local-pod", "borrowed", "external")


@dataclass(frozen=True)
class RouteStatus:
    """What a node's agent programmed for one destination (published for operators, lease-bound)."""

    node: str
    cidr: str
    type: str  # one of ROUTE_TYPES
    via: str | None = None
    dev: str | None = None
    encapsulation: str = "none"
    learned_from: str | None = None  # peer IP the route came from, or None for local

    @classmethod
    def from_json(cls, d: JsonObject) -> RouteStatus:
        via = f.opt_string(d, "via")
        return cls(
            node=f.string(d, "node"),
            cidr=f.cidr(f.string(d, "cidr"), "cidr"),
            type=f.choice(d, "type", ROUTE_TYPES),
            via=None if via is None else f.ip(via, "via"),
            dev=f.opt_string(d, "dev"),
            encapsulation=f.choice(d, "encapsulation", ENCAPSULATIONS, "none"),
            learned_from=f.opt_string(d, "learnedFrom"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "cidr": self.cidr,
            "type": self.type,
            "via": self.via,
            "dev": self.dev,
            "encapsulation": self.encapsulation,
            "learnedFrom": self.learned_from,
        }


PEER_TYPES = ("node-to-node mesh", "route reflector", "route reflector client", "global", "node specific")


@dataclass(frozen=True)
class BGPPeerStatus:
    node: str
    peer_ip: str
    peer_type: str
    state: str  # BGP FSM state: Idle, Connect, Active, OpenSent, OpenConfirm, Established; or "Invalid"
    since: str = ""  # ISO 8601 time of the last state change
    info: str = ""
    as_number: int | None = None
    prefixes_received: int = 0
    prefixes_sent: int = 0

    @classmethod
    def from_json(cls, d: JsonObject) -> BGPPeerStatus:
        return cls(
            node=f.string(d, "node"),
            peer_ip=f.ip(f.string(d, "peerIP"), "peerIP"),
            peer_type=f.choice(d, "peerType", PEER_TYPES),
            state=f.string(d, "state"),
            since=f.string(d, "since", ""),
            info=f.string(d, "info", ""),
            as_number=f.opt_integer(d, "asNumber", lo=1, hi=MAX_AS),
            prefixes_received=f.integer(d, "prefixesReceived", 0, lo=0),
            prefixes_sent=f.integer(d, "prefixesSent", 0, lo=0),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "peerIP": self.peer_ip,
            "peerType": self.peer_type,
            "state": self.state,
            "since": self.since,
            "info": self.info,
            "asNumber": self.as_number,
            "prefixesReceived": self.prefixes_received,
            "prefixesSent": self.prefixes_sent,
        }


@dataclass(frozen=True)
class AgentStatus:
    """A node agent's own state for operators (lease-bound): in sync with the datastore or not, its BGP identity,
    what it could not program, and (written by ``podnet-agent``) its readiness, its run modes and the datastore
    revision each half of the dataplane reflects.

    ``revision`` is the datastore revision the agent has seen; ``policy_revision`` / ``routes_revision`` the one the
    policy rules / the routes and devices in the kernel were last computed from (None: that mode is off, or nothing
    applied yet). A tool that made a change at revision R waits until both are at least R."""

    node: str
    in_sync: bool = False
    revision: int = 0
    router_id: str | None = None
    as_number: int | None = None
    since: str = ""  # ISO 8601 time in_sync last changed
    problems: tuple[str, ...] = ()
    ready: bool | None = None  # None: not reported (a bare node runner)
    not_ready: tuple[str, ...] = ()  # "component: reason" for each component that is not ready
    modes: tuple[str, ...] = ()  # of "router", "firewall", "cni"
    policy_revision: int | None = None
    routes_revision: int | None = None
    rejected_policies: tuple[str, ...] = ()  # "namespace/name: reason"
    version: str = ""

    @classmethod
    def from_json(cls, d: JsonObject) -> AgentStatus:
        rid = f.opt_string(d, "routerID")
        ready = d.get("ready")
        if ready is not None and not isinstance(ready, bool):
            raise ModelError(f"ready: expected a boolean or null, found {type(ready).__name__}")
        return cls(
            node=f.string(d, "node"),
            in_sync=f.boolean(d, "inSync"),
            revision=f.integer(d, "revision", 0, lo=0),
            router_id=None if rid is None else f.ip(rid, "routerID"),
            as_number=f.opt_integer(d, "asNumber", lo=1, hi=MAX_AS),
            since=f.string(d, "since", ""),
            problems=f.string_list(d, "problems"),
            ready=ready,
            not_ready=f.string_list(d, "notReady"),
            modes=f.string_list(d, "modes"),
            policy_revision=f.opt_integer(d, "policyRevision", lo=0),
            routes_revision=f.opt_integer(d, "routesRevision", lo=0),
            rejected_policies=f.string_list(d, "rejectedPolicies"),
            version=f.string(d, "version", ""),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "node": self.node,
            "inSync": self.in_sync,
            "revision": self.revision,
            "routerID": self.router_id,
            "asNumber": self.as_number,
            "since": self.since,
            "problems": list(self.problems),
        }
        if self.ready is not None:
            out |= {
                "ready": self.ready,
                "notReady": list(self.not_ready),
                "modes": list(self.modes),
                "policyRevision": self.policy_revision,
                "routesRevision": self.routes_revision,
                "rejectedPolicies": list(self.rejected_policies),
                "version": self.version,
            }
        return out
