"""The agent's consistent view of the datastore, as the pure calculations take it. Built by ``agent.cache``.

A change must cost what changed plus the node's own pods, never a pass over the cluster (a node of a 1 000-node
cluster holds every node's pods and endpoints). So the cache hands out persistent maps (taking a snapshot copies
nothing), indexes endpoints by node, and keeps a journal of changed keys: a calculation that remembers the last
snapshot it used asks ``changes_since`` for what changed in between instead of comparing whole maps. Snapshots
built by hand (tests, ``agentctl``) have no journal: their consumers compare maps, with the same result.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from datastore import model as m

EndpointId = tuple[str, str, str, str]  # (node, namespace, pod, iface)
Changes = Mapping[str, frozenset[object]]  # snapshot field name -> keys written or deleted


class Journal(Protocol):
    def since(self, generation: int, until: int) -> Changes | None:
        """Keys changed after ``generation`` up to ``until``; None when that history is no longer kept."""
        ...


@dataclass(frozen=True)
class Snapshot:
    """Everything the agent reads from etcd, at one revision. Maps are keyed by the natural identity of each
    object; they are read-only (the cache's are immutable)."""

    revision: int = 0
    in_sync: bool = False
    config: m.ClusterConfig = field(default_factory=m.ClusterConfig)
    bgp_peers: Mapping[str, m.BGPPeer] = field(default_factory=dict)  # name ->
    pools: Mapping[str, m.IPPool] = field(default_factory=dict)  # cidr ->
    blocks: Mapping[str, m.Block] = field(default_factory=dict)  # cidr ->
    affinities: Mapping[tuple[str, str], m.Affinity] = field(default_factory=dict)  # (node, cidr) ->
    nodes: Mapping[str, m.Node] = field(default_factory=dict)  # name ->
    pods: Mapping[tuple[str, str], m.Pod] = field(default_factory=dict)  # (namespace, name) ->
    namespaces: Mapping[str, m.Namespace] = field(default_factory=dict)  # name ->
    policies: Mapping[tuple[str, str], m.Policy] = field(default_factory=dict)  # (namespace, name) ->
    endpoints: Mapping[EndpointId, m.Endpoint] = field(default_factory=dict)
    # Policy keys whose stored value cannot be read, (namespace, name) -> reason: the compiler fences them (fail
    # closed) instead of treating them as absent.
    broken_policies: Mapping[tuple[str, str], str] = field(default_factory=dict)
    # node -> its endpoints (the cache maintains it; None: derived from ``endpoints`` when asked)
    endpoints_by_node: Mapping[str, Mapping[EndpointId, m.Endpoint]] | None = None
    generation: int = 0  # the cache's change counter when this snapshot was taken
    journal: Journal | None = field(default=None, compare=False, repr=False)

    def local_endpoints(self, node: str) -> list[m.Endpoint]:
        """``node``'s endpoints, in key order: O(local endpoints) with the cache's index."""
        if self.endpoints_by_node is not None:
            mine = self.endpoints_by_node.get(node, {})
            return [mine[key] for key in sorted(mine)]
        return [ep for key, ep in sorted(self.endpoints.items()) if key[0] == node]

    def changes_since(self, earlier: Snapshot | None) -> Changes | None:
        """The keys changed (per field) between ``earlier`` and this snapshot of the same cache, or None when that
        cannot be told (different caches, no journal, history dropped): then compare the maps."""
        if earlier is None or self.journal is None or earlier.journal is not self.journal:
            return None
        if earlier.generation > self.generation:
            return None
        return self.journal.since(earlier.generation, self.generation)
