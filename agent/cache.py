"""The agent's cache: consumes the datastore watcher's stream and hands out consistent ``Snapshot``s.

Consumers register a callback that is told "something changed" (not what): they take a fresh snapshot when they
are ready, so a burst of updates coalesces into one recalculation. Status keys (routes, BGP peer status) and IPAM
handles are not cached: the agent does not compute from them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import replace

from agent.calc.snapshot import Snapshot
from datastore import keys as k
from datastore import model as m
from datastore.etcd import EtcdClient
from datastore.watcher import Deleted, InSync, Malformed, Update, Updated, Watcher

log = logging.getLogger(__name__)

# Each watched prefix and the snapshot field it fills.
WATCHED = (
    k.CONFIG_PREFIX,
    k.POOLS_PREFIX,
    k.BLOCKS_PREFIX,
    k.AFFINITY_PREFIX,
    k.NODES_PREFIX,
    k.PODS_PREFIX,
    k.NAMESPACES_PREFIX,
    k.POLICIES_PREFIX,
    k.ENDPOINTS_PREFIX,
)


def _field_and_id(key: k.Key) -> tuple[str, object] | None:
    match key:
        case k.BGPPeerKey(name=name):
            return "bgp_peers", name
        case k.PoolKey(cidr=cidr):
            return "pools", cidr
        case k.BlockKey(cidr=cidr):
            return "blocks", cidr
        case k.AffinityKey(node=node, cidr=cidr):
            return "affinities", (node, cidr)
        case k.NodeKey(name=name):
            return "nodes", name
        case k.PodKey(namespace=ns, name=name):
            return "pods", (ns, name)
        case k.NamespaceKey(name=name):
            return "namespaces", name
        case k.PolicyKey(namespace=ns, name=name):
            return "policies", (ns, name)
        case k.EndpointKey(node=node, namespace=ns, pod=pod, iface=iface):
            return "endpoints", (node, ns, pod, iface)
    return None


class Cache:
    def __init__(self, client: EtcdClient, on_change: Callable[[], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._maps: dict[str, dict[object, object]] = {
            name: {}
            for name in (
                "bgp_peers",
                "pools",
                "blocks",
                "affinities",
                "nodes",
                "pods",
                "namespaces",
                "policies",
                "endpoints",
            )
        }
        self._config = m.ClusterConfig()
        self._broken_policies: dict[tuple[str, str], str] = {}  # (namespace, name) -> why it cannot be read
        self._revision = 0
        self._synced: set[str] = set()
        self._on_change = on_change
        self.in_sync = threading.Event()
        self.watchers = [Watcher(client, prefix, self._sink_for(prefix)) for prefix in WATCHED]

    def start(self) -> Cache:
        for w in self.watchers:
            w.start()
        return self

    def stop(self) -> None:
        for w in self.watchers:
            w.stop()

    def _sink_for(self, prefix: str) -> Callable[[Update], None]:
        def sink(update: Update) -> None:
            self._apply(prefix, update)

        return sink

    def _apply(self, prefix: str, update: Update) -> None:
        with self._lock:
            if isinstance(update, InSync):
                self._synced.add(prefix)
                self._revision = max(self._revision, update.revision)
                if len(self._synced) == len(WATCHED):
                    self.in_sync.set()
            elif isinstance(update, Updated):
                self._revision = max(self._revision, update.mod_revision)
                if isinstance(update.key, k.PolicyKey):
                    self._broken_policies.pop((update.key.namespace, update.key.name), None)
                if isinstance(update.value, m.ClusterConfig):
                    self._config = update.value
                else:
                    where = _field_and_id(update.key)
                    if where is not None:
                        self._maps[where[0]][where[1]] = update.value
            elif isinstance(update, (Deleted, Malformed)):
                self._revision = max(self._revision, update.mod_revision)
                if isinstance(update.key, k.PolicyKey):
                    # A policy that cannot be read must not open what it isolated: the compiler fences its
                    # namespace while it is broken (fail closed), so remember it rather than forget it.
                    ident = (update.key.namespace, update.key.name)
                    if isinstance(update, Malformed):
                        self._broken_policies[ident] = update.reason
                    else:
                        self._broken_policies.pop(ident, None)
                if update.key is None:
                    pass
                elif isinstance(update.key, k.ClusterConfigKey):
                    self._config = m.ClusterConfig()
                else:
                    where = _field_and_id(update.key)
                    if where is not None:
                        self._maps[where[0]].pop(where[1], None)
        if self._on_change is not None:
            self._on_change()

    def malformed(self) -> dict[str, str]:
        """Keys currently skipped because their values do not parse (path -> reason), across every watch."""
        out: dict[str, str] = {}
        for w in self.watchers:
            out.update(w.malformed)
        return out

    def snapshot(self) -> Snapshot:
        with self._lock:
            maps = {name: dict(values) for name, values in self._maps.items()}
            return replace(
                Snapshot(),
                revision=self._revision,
                in_sync=self.in_sync.is_set(),
                config=self._config,
                broken_policies=dict(self._broken_policies),
                **maps,  # type: ignore[arg-type]
            )
