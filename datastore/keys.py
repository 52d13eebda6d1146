"""The etcd key layout: builders and a parser for every key podnet stores. No other module spells a key.

Layout (root ``/podnet/v1``; CIDRs are written with ``-`` for ``/`` so a key has no extra path segment)::

    config/cluster                          ClusterConfig
    config/bgppeers/<name>                  BGPPeer (global, or node-specific when it names a node)
    ipam/pools/<cidr>                       IPPool
    ipam/blocks/<cidr>                      Block
    ipam/affinity/<node>/<cidr>             Affinity
    ipam/handles/<handle>                   Handle
    nodes/<node>                            Node
    pods/<ns>/<pod>                         Pod
    namespaces/<ns>                         Namespace
    policies/<ns>/<name>                    Policy
    endpoints/<node>/<ns>/<pod>/<iface>     Endpoint
    routes/<node>/<cidr>                    RouteStatus   (lease-bound)
    bgp/<node>/peers/<peer-ip>              BGPPeerStatus (lease-bound)
    agents/<node>                           AgentStatus   (lease-bound)
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import ClassVar

ROOT = "/podnet/v1"

# A path segment: what Kubernetes allows in names, plus the characters handles and interface names use.
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+=-]{0,252}$")


class InvalidKey(ValueError):
    """A key or key part that does not fit the layout."""


def _segment(value: str, what: str) -> str:
    if not _SEGMENT.match(value):
        raise InvalidKey(f"invalid {what} {value!r} for an etcd key segment")
    return value


def encode_cidr(cidr: str) -> str:
    """``10.244.1.0/26`` → ``10.244.1.0-26`` (normalised; host bits must be zero)."""
    try:
        net = ipaddress.ip_network(cidr, strict=True)
    except ValueError as exc:
        raise InvalidKey(f"invalid CIDR {cidr!r}: {exc}") from None
    return f"{net.network_address}-{net.prefixlen}"


def decode_cidr(segment: str) -> str:
    """``10.244.1.0-26`` → ``10.244.1.0/26``."""
    addr, sep, plen = segment.rpartition("-")
    if not sep:
        raise InvalidKey(f"invalid encoded CIDR {segment!r}")
    try:
        return str(ipaddress.ip_network(f"{addr}/{plen}", strict=True))
    except ValueError as exc:
        raise InvalidKey(f"invalid encoded CIDR {segment!r}: {exc}") from None


def _ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise InvalidKey(f"invalid IP address {value!r}") from None


@dataclass(frozen=True)
class Key:
    """A parsed key. Subclasses name their parts; ``path`` renders the key."""

    kind: ClassVar[str] = ""

    @property
    def path(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class ClusterConfigKey(Key):
    kind: ClassVar[str] = "clusterconfig"

    @property
    def path(self) -> str:
        return f"{ROOT}/config/cluster"


@dataclass(frozen=True)
class BGPPeerKey(Key):
    name: str
    kind: ClassVar[str] = "bgppeer"

    @property
    def path(self) -> str:
        return f"{ROOT}/config/bgppeers/{_segment(self.name, 'peer name')}"


@dataclass(frozen=True)
class PoolKey(Key):
    cidr: str
    kind: ClassVar[str] = "pool"

    @property
    def path(self) -> str:
        return f"{ROOT}/ipam/pools/{encode_cidr(self.cidr)}"


@dataclass(frozen=True)
class BlockKey(Key):
    cidr: str
    kind: ClassVar[str] = "block"

    @property
    def path(self) -> str:
        return f"{ROOT}/ipam/blocks/{encode_cidr(self.cidr)}"


@dataclass(frozen=True)
class AffinityKey(Key):
    node: str
    cidr: str
    kind: ClassVar[str] = "affinity"

    @property
    def path(self) -> str:
        return f"{ROOT}/ipam/affinity/{_segment(self.node, 'node name')}/{encode_cidr(self.cidr)}"


@dataclass(frozen=True)
class HandleKey(Key):
    handle: str
    kind: ClassVar[str] = "handle"

    @property
    def path(self) -> str:
        return f"{ROOT}/ipam/handles/{_segment(self.handle, 'handle')}"


@dataclass(frozen=True)
class NodeKey(Key):
    name: str
    kind: ClassVar[str] = "node"

    @property
    def path(self) -> str:
        return f"{ROOT}/nodes/{_segment(self.name, 'node name')}"


@dataclass(frozen=True)
class PodKey(Key):
    namespace: str
    name: str
    kind: ClassVar[str] = "pod"

    @property
    def path(self) -> str:
        return f"{ROOT}/pods/{_segment(self.namespace, 'namespace')}/{_segment(self.name, 'pod name')}"


@dataclass(frozen=True)
class NamespaceKey(Key):
    name: str
    kind: ClassVar[str] = "namespace"

    @property
    def path(self) -> str:
        return f"{ROOT}/namespaces/{_segment(self.name, 'namespace')}"


@dataclass(frozen=True)
class PolicyKey(Key):
    namespace: str
    name: str
    kind: ClassVar[str] = "policy"

    @property
    def path(self) -> str:
        return f"{ROOT}/policies/{_segment(self.namespace, 'namespace')}/{_segment(self.name, 'policy name')}"


@dataclass(frozen=True)
class EndpointKey(Key):
    node: str
    namespace: str
    pod: str
    iface: str
    kind: ClassVar[str] = "endpoint"

    @property
    def path(self) -> str:
        return (
            f"{ROOT}/endpoints/{_segment(self.node, 'node name')}/{_segment(self.namespace, 'namespace')}"
            f"/{_segment(self.pod, 'pod name')}/{_segment(self.iface, 'interface')}"
        )


@dataclass(frozen=True)
class RouteKey(Key):
    node: str
    cidr: str
    kind: ClassVar[str] = "route"

    @property
    def path(self) -> str:
        return f"{ROOT}/routes/{_segment(self.node, 'node name')}/{encode_cidr(self.cidr)}"


@dataclass(frozen=True)
class BGPPeerStatusKey(Key):
    node: str
    peer_ip: str
    kind: ClassVar[str] = "bgppeerstatus"

    @property
    def path(self) -> str:
        return f"{ROOT}/bgp/{_segment(self.node, 'node name')}/peers/{_ip(self.peer_ip)}"


@dataclass(frozen=True)
class AgentStatusKey(Key):
    node: str
    kind: ClassVar[str] = "agentstatus"

    @property
    def path(self) -> str:
        return f"{ROOT}/agents/{_segment(self.node, 'node name')}"


# Prefixes for watches and listings. A prefix always ends in "/" so "nodes/a" never matches "nodes/ab".
CONFIG_PREFIX = f"{ROOT}/config/"
BGP_PEERS_PREFIX = f"{ROOT}/config/bgppeers/"
POOLS_PREFIX = f"{ROOT}/ipam/pools/"
BLOCKS_PREFIX = f"{ROOT}/ipam/blocks/"
AFFINITY_PREFIX = f"{ROOT}/ipam/affinity/"
HANDLES_PREFIX = f"{ROOT}/ipam/handles/"
NODES_PREFIX = f"{ROOT}/nodes/"
PODS_PREFIX = f"{ROOT}/pods/"
NAMESPACES_PREFIX = f"{ROOT}/namespaces/"
POLICIES_PREFIX = f"{ROOT}/policies/"
ENDPOINTS_PREFIX = f"{ROOT}/endpoints/"
ROUTES_PREFIX = f"{ROOT}/routes/"
BGP_STATUS_PREFIX = f"{ROOT}/bgp/"
AGENTS_PREFIX = f"{ROOT}/agents/"


def affinity_prefix(node: str) -> str:
    return f"{AFFINITY_PREFIX}{_segment(node, 'node name')}/"


def endpoints_prefix(node: str) -> str:
    return f"{ENDPOINTS_PREFIX}{_segment(node, 'node name')}/"


def routes_prefix(node: str) -> str:
    return f"{ROUTES_PREFIX}{_segment(node, 'node name')}/"


def bgp_status_prefix(node: str) -> str:
    return f"{BGP_STATUS_PREFIX}{_segment(node, 'node name')}/peers/"


def parse_key(path: str) -> Key:
    """Parse a full key into its typed form. Raises ``InvalidKey`` for anything outside the layout."""
    if not path.startswith(ROOT + "/"):
        raise InvalidKey(f"key {path!r} is not under {ROOT}/")
    parts = path[len(ROOT) + 1 :].split("/")
    match parts:
        case ["config", "cluster"]:
            key: Key = ClusterConfigKey()
        case ["config", "bgppeers", name]:
            key = BGPPeerKey(name)
        case ["ipam", "pools", cidr]:
            key = PoolKey(decode_cidr(cidr))
        case ["ipam", "blocks", cidr]:
            key = BlockKey(decode_cidr(cidr))
        case ["ipam", "affinity", node, cidr]:
            key = AffinityKey(node, decode_cidr(cidr))
        case ["ipam", "handles", handle]:
            key = HandleKey(handle)
        case ["nodes", name]:
            key = NodeKey(name)
        case ["pods", ns, name]:
            key = PodKey(ns, name)
        case ["namespaces", name]:
            key = NamespaceKey(name)
        case ["policies", ns, name]:
            key = PolicyKey(ns, name)
        case ["endpoints", node, ns, pod, iface]:
            key = EndpointKey(node, ns, pod, iface)
        case ["routes", node, cidr]:
            key = RouteKey(node, decode_cidr(cidr))
        case ["bgp", node, "peers", peer]:
            key = BGPPeerStatusKey(node, _ip(peer))
        case ["agents", node]:
            key = AgentStatusKey(node)
        case _:
            raise InvalidKey(f"key {path!r} does not match the podnet layout")
    # Rendering validates every segment; a key that does not render back identically is not ours.
    if key.path != path:
        raise InvalidKey(f"key {path!r} is not in canonical form (expected {key.path!r})")
    return key
