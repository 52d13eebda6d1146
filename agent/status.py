"""Operator status in etcd: the routes this node programmed and its BGP peers' state, bound to the agent's lease.

Only differences from what was last published are written. The first publish after start (or after the lease was
lost) also deletes what an earlier run left under this node's prefixes, so the datastore shows this run only.
A failed write is retried on the next publish; status never stops the agent.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import TypeVar

from datastore import codec
from datastore import keys as k
from datastore import model as m
from datastore.errors import DatastoreError
from datastore.etcd import EtcdClient, LeaseKeeper
from datastore.store import Store

log = logging.getLogger(__name__)

DEFAULT_TTL = 20

S = TypeVar("S", m.RouteStatus, m.BGPPeerStatus)
AGENT = "agent"  # the _published slot of the agent's own status key


class StatusPublisher:
    def __init__(self, client: EtcdClient, node: str, ttl: int = DEFAULT_TTL) -> None:
        self.client = client
        self.store = Store(client)
        self.node = node
        self.ttl = ttl
        self._lock = threading.Lock()
        self._lease: LeaseKeeper | None = None
        self._published: dict[str, dict[str, codec.Model]] = {}  # prefix -> key path -> value
        self._fresh: set[str] = set()  # prefixes whose leftovers were cleaned under the current lease

    def publish_routes(self, routes: Mapping[str, m.RouteStatus]) -> bool:
        return self._publish(k.routes_prefix(self.node), routes)

    def publish_peers(self, peers: Mapping[str, m.BGPPeerStatus]) -> bool:
        return self._publish(k.bgp_status_prefix(self.node), peers)

    def publish_agent(self, status: m.AgentStatus) -> bool:
        with self._lock:
            try:
                lease = self._lease_id()
                slot = self._published.setdefault(AGENT, {})
                path = codec.key_of(status).path
                if slot.get(path) != status:
                    self.store.put(status, lease=lease)
                    slot[path] = status
            except DatastoreError as exc:
                log.warning("publishing agent status failed (will retry): %s", exc)
                return False
            return True

    def close(self, revoke: bool = True) -> None:
        """Stop keeping the lease alive; ``revoke`` removes every status key now (else when the TTL runs out)."""
        with self._lock:
            if self._lease is not None:
                self._lease.close(revoke=revoke)
                self._lease = None

    def _lease_id(self) -> int:
        if self._lease is None or self._lease.lost.is_set():
            if self._lease is not None:
                log.warning("status lease lost: republishing everything")
                self._lease.close(revoke=False)
            self._lease = self.client.lease(self.ttl)
            self._published.clear()
            self._fresh.clear()
        return self._lease.id

    def _publish(self, prefix: str, values: Mapping[str, S]) -> bool:
        """True when etcd now holds exactly ``values`` under ``prefix``."""
        with self._lock:
            try:
                lease = self._lease_id()
                want = {codec.key_of(v).path: v for v in values.values()}
                have = self._published.setdefault(prefix, {})
                if prefix not in self._fresh:
                    kvs, _ = self.client.get_prefix(prefix)
                    for kv in kvs:
                        if kv.key not in want:
                            self.client.delete(kv.key)
                    have.clear()
                    self._fresh.add(prefix)
                for path, value in want.items():
                    if have.get(path) != value:
                        self.store.put(value, lease=lease)
                        have[path] = value
                for path in [p for p in have if p not in want]:
                    self.client.delete(path)
                    del have[path]
            except DatastoreError as exc:
                log.warning("publishing status under %s failed (will retry): %s", prefix, exc)
                self._fresh.discard(prefix)  # state in etcd is unknown now: reconcile in full next time
                return False
            return True
