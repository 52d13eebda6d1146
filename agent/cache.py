"""The agent's cache: consumes the datastore watcher's stream and hands out consistent ``Snapshot``s.

Consumers subscribe a callback that is told "something changed" (not what): they take a fresh snapshot when they
are ready, so a burst of updates coalesces into one recalculation. Status keys (routes, BGP peer status) and IPAM
handles are not cached: the agent does not compute from them.

The maps are persistent (``immutables.Map``: a write costs O(log n), a snapshot copies nothing), endpoints are
indexed by node, and every write is journalled (field, key) so a calculation asks what changed since the snapshot
it used last (``Snapshot.changes_since``) instead of comparing the cluster: a change costs what it touches.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from immutables import Map

from agent.calc.snapshot import Changes, EndpointId, Snapshot
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
FIELDS = (
    "bgp_peers",
    "pools",
    "blocks",
    "affinities",
    "nodes",
    "pods",
    "namespaces",
    "policies",
    "endpoints",
    "broken_policies",
)
JOURNAL_LIMIT = 200_000  # journalled writes kept; a consumer further behind compares maps instead


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


class _Journal:
    """Which keys were written, in order; generation g is the g-th write since the cache started. Read and
    appended under the cache's lock."""

    def __init__(self, lock: threading.Lock, limit: int = JOURNAL_LIMIT) -> None:
        self._lock = lock
        self._limit = limit
        self._entries: list[tuple[str, object]] = []
        self._first = 0  # generation of the write before _entries[0]
        self.generation = 0

    def append(self, name: str, key: object) -> None:
        self._entries.append((name, key))
        self.generation += 1
        if len(self._entries) > self._limit:
            drop = len(self._entries) - self._limit // 2
            del self._entries[:drop]
            self._first += drop

    def since(self, generation: int, until: int) -> Changes | None:
        with self._lock:
            if generation < self._first or until > self.generation:
                return None
            out: dict[str, set[object]] = {}
            for name, key in self._entries[generation - self._first : until - self._first]:
                out.setdefault(name, set()).add(key)
        return {name: frozenset(keys) for name, keys in out.items()}


class Cache:
    def __init__(
        self, client: EtcdClient | None, on_change: Callable[[], None] | None = None, *, log_retries: bool = True
    ) -> None:
        """``client`` None: a cache fed by ``apply`` only (benchmarks, tests). ``log_retries=False``: the watches
        log their retries at debug level; the owner reports an outage once (``Watcher.failing``)."""
        self._lock = threading.Lock()
        self._maps: dict[str, Map[Any, Any]] = {name: Map() for name in FIELDS}
        self._by_node: Map[str, Map[EndpointId, m.Endpoint]] = Map()
        self._journal = _Journal(self._lock)
        self._config = m.ClusterConfig()
        self._revision = 0
        self._synced: set[str] = set()
        self._subscribers: list[Callable[[], None]] = [on_change] if on_change is not None else []
        self.in_sync = threading.Event()
        self.watchers = (
            [] if client is None else [Watcher(client, p, self._sink_for(p), log_retries=log_retries) for p in WATCHED]
        )

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (cheap, from a watcher thread) after every change."""
        self._subscribers.append(callback)

    def start(self) -> Cache:
        for w in self.watchers:
            w.start()
        return self

    def stop(self) -> None:
        for w in self.watchers:
            w.stop()

    def _sink_for(self, prefix: str) -> Callable[[Update], None]:
        def sink(update: Update) -> None:
            self.apply(prefix, update)

        return sink

    def apply(self, prefix: str, update: Update) -> None:
        """Take one update of the watch on ``prefix`` (what the watchers call)."""
        with self._lock:
            if isinstance(update, InSync):
                self._synced.add(prefix)
                self._revision = max(self._revision, update.revision)
                if len(self._synced) == len(WATCHED):
                    self.in_sync.set()
            else:
                self._revision = max(self._revision, update.mod_revision)
                self._write(update)
        for callback in self._subscribers:
            callback()

    def _write(self, update: Updated | Deleted | Malformed) -> None:
        key = update.key
        if isinstance(key, k.PolicyKey):
            # A policy that cannot be read must not open what it isolated: the compiler fences its namespace while
            # it is broken (fail closed), so remember it rather than forget it.
            ident = (key.namespace, key.name)
            if isinstance(update, Malformed):
                self._set("broken_policies", ident, update.reason)
            elif ident in self._maps["broken_policies"]:
                self._set("broken_policies", ident, None)
        if key is None:
            return
        if isinstance(key, k.ClusterConfigKey):
            config = update.value if isinstance(update, Updated) else None
            self._config = config if isinstance(config, m.ClusterConfig) else m.ClusterConfig()
            return
        where = _field_and_id(key)
        if where is None:
            return
        value = update.value if isinstance(update, Updated) else None
        self._set(where[0], where[1], value)
        if where[0] == "endpoints":
            ep_id = cast(EndpointId, where[1])
            mine = self._by_node.get(ep_id[0], Map())
            if value is not None:
                mine = mine.set(ep_id, cast(m.Endpoint, value))
            elif ep_id in mine:
                mine = mine.delete(ep_id)
            if mine:
                self._by_node = self._by_node.set(ep_id[0], mine)
            elif ep_id[0] in self._by_node:
                self._by_node = self._by_node.delete(ep_id[0])

    def _set(self, name: str, ident: object, value: object | None) -> None:
        table = self._maps[name]
        if value is not None:
            self._maps[name] = table.set(ident, value)
        elif ident in table:
            self._maps[name] = table.delete(ident)
        else:
            return
        self._journal.append(name, ident)

    def problems(self, progress_timeout: float = 30.0) -> list[str]:
        """Why the cache cannot be trusted to follow etcd (empty: it can): a watch thread that died, or one that
        has heard nothing from etcd (not even a progress answer, asked for every few seconds) for longer than
        ``progress_timeout`` seconds. The daemon's liveness reports these."""
        now = time.monotonic()
        out = []
        for w in self.watchers:
            if not w.alive():
                out.append(f"watch {w.prefix}: thread ended")
            elif now - w.last_progress > progress_timeout:
                out.append(f"watch {w.prefix}: no progress for {now - w.last_progress:.0f} s")
        return out

    def malformed(self) -> dict[str, str]:
        """Keys currently skipped because their values do not parse (path -> reason), across every watch."""
        out: dict[str, str] = {}
        for w in self.watchers:
            out.update(w.malformed)
        return out

    def snapshot(self) -> Snapshot:
        """O(1): the maps are immutable and shared."""
        with self._lock:
            t = self._maps
            return Snapshot(
                revision=self._revision,
                in_sync=self.in_sync.is_set(),
                config=self._config,
                bgp_peers=t["bgp_peers"],
                pools=t["pools"],
                blocks=t["blocks"],
                affinities=t["affinities"],
                nodes=t["nodes"],
                pods=t["pods"],
                namespaces=t["namespaces"],
                policies=t["policies"],
                endpoints=t["endpoints"],
                broken_policies=t["broken_policies"],
                endpoints_by_node=self._by_node,
                generation=self._journal.generation,
                journal=self._journal,
            )
