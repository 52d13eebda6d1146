"""The agent's consistent view of the datastore, as the pure calculations take it. Built by ``agent.cache``."""

from __future__ import annotations

from dataclasses import dataclass, field

from datastore import model as m


@dataclass(frozen=True)
class Snapshot:
    """Everything the agent reads from etcd, at one revision. Maps are keyed by the natural identity of each
    object; treat them as read-only."""

    revision: int = 0
    in_sync: bool = False
    config: m.ClusterConfig = field(default_factory=m.ClusterConfig)
    bgp_peers: dict[str, m.BGPPeer] = field(default_factory=dict)  # name ->
    pools: dict[str, m.IPPool] = field(default_factory=dict)  # cidr ->
    blocks: dict[str, m.Block] = field(default_factory=dict)  # cidr ->
    affinities: dict[tuple[str, str], m.Affinity] = field(default_factory=dict)  # (node, cidr) ->
    nodes: dict[str, m.Node] = field(default_factory=dict)  # name ->
    pods: dict[tuple[str, str], m.Pod] = field(default_factory=dict)  # (namespace, name) ->
    namespaces: dict[str, m.Namespace] = field(default_factory=dict)  # name ->
    policies: dict[tuple[str, str], m.Policy] = field(default_factory=dict)  # (namespace, name) ->
    endpoints: dict[tuple[str, str, str, str], m.Endpoint] = field(default_factory=dict)  # (node, ns, pod, iface) ->
    # Policy keys whose stored value cannot be read, (namespace, name) -> reason: the compiler fences them (fail
    # closed) instead of treating them as absent.
    broken_policies: dict[tuple[str, str], str] = field(default_factory=dict)

    def local_endpoints(self, node: str) -> list[m.Endpoint]:
        return [ep for key, ep in sorted(self.endpoints.items()) if key[0] == node]
