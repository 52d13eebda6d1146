"""Operator status in etcd: the routes this node programmed, its BGP peers' state and the agent's own state, bound
to the agent's lease.

``StatusPublisher`` writes synchronously, only what differs from what it last wrote. The first write of a prefix
under a lease (after start, after the lease was lost, after any failed write) re-lists the prefix: what is not
wanted (an earlier run's leftovers) is deleted, and what etcd already holds under our lease is not written again, so
that after an outage only real changes are written.

``StatusReporter`` runs the publisher on a thread of its own, so that status never delays the dataplane: a runner
pass hands it the newest desired status and goes on (the latest value wins: a status superseded while etcd was slow
or away is never written). Only the reporter waits for etcd; while etcd fails it retries with a jittered
exponential backoff, and says so in the log once when the outage starts and once when it ends.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from datastore import codec
from datastore import keys as k
from datastore import model as m
from datastore.errors import DatastoreError, LeaseLost
from datastore.etcd import EtcdClient, LeaseKeeper
from datastore.fields import ModelError
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
        # Called (from the lease's thread) when etcd forgot our lease: every status key is gone and must be rewritten.
        self.on_lease_lost: Callable[[], None] | None = None
        self._lock = threading.Lock()
        self._lease: LeaseKeeper | None = None
        self._lease_dead = False  # a write was refused for an unknown lease
        self._published: dict[str, dict[str, codec.Model]] = {}  # prefix -> key path -> value
        self._fresh: set[str] = set()  # prefixes re-listed under the current lease since their last failure

    # -- writers: raise DatastoreError; nothing is lost, the next call reconciles -------------------------------

    def write_routes(self, routes: Mapping[str, m.RouteStatus]) -> None:
        self._write(k.routes_prefix(self.node), routes)

    def write_peers(self, peers: Mapping[str, m.BGPPeerStatus]) -> None:
        self._write(k.bgp_status_prefix(self.node), peers)

    def write_agent(self, status: m.AgentStatus) -> None:
        with self._lock:
            lease = self._lease_id()
            slot = self._published.setdefault(AGENT, {})
            path = codec.key_of(status).path
            if slot.get(path) != status:
                slot.pop(path, None)  # unknown until the put returns
                self._put(status, lease)
                slot[path] = status

    # -- the same, logging a failure and returning whether etcd now holds the values ---------------------------

    def publish_routes(self, routes: Mapping[str, m.RouteStatus]) -> bool:
        return _logged(lambda: self.write_routes(routes), "routes")

    def publish_peers(self, peers: Mapping[str, m.BGPPeerStatus]) -> bool:
        return _logged(lambda: self.write_peers(peers), "BGP peers")

    def publish_agent(self, status: m.AgentStatus) -> bool:
        return _logged(lambda: self.write_agent(status), "agent")

    def close(self, revoke: bool = True) -> None:
        """Stop keeping the lease alive; ``revoke`` removes every status key now (else when the TTL runs out)."""
        with self._lock:
            if self._lease is not None:
                self._lease.close(revoke=revoke)
                self._lease = None

    def _lease_id(self) -> int:
        if self._lease is None or self._lease.lost.is_set() or self._lease_dead:
            if self._lease is not None:
                log.warning("status lease lost: republishing everything")
                self._lease.close(revoke=False)
                self._lease = None
            self._published.clear()
            self._fresh.clear()
            self._lease_dead = False
            self._lease = self.client.lease(self.ttl, on_lost=self._lease_lost)
        return self._lease.id

    def _lease_lost(self) -> None:
        if self.on_lease_lost is not None:
            self.on_lease_lost()

    def _put(self, value: codec.Model, lease: int) -> None:
        try:
            self.store.put(value, lease=lease)
        except LeaseLost:
            self._lease_dead = True  # grant a new one on the next attempt
            raise

    def _write(self, prefix: str, values: Mapping[str, S]) -> None:
        """Make etcd hold exactly ``values`` under ``prefix``."""
        with self._lock:
            try:
                lease = self._lease_id()
                want = {codec.key_of(v).path: v for v in values.values()}
                have = self._published.setdefault(prefix, {})
                if prefix not in self._fresh:
                    have.clear()
                    have.update(self._relist(prefix, want, lease))
                    self._fresh.add(prefix)
                for path, value in want.items():
                    if have.get(path) != value:
                        have.pop(path, None)
                        self._put(value, lease)
                        have[path] = value
                for path in [p for p in have if p not in want]:
                    self.client.delete(path)
                    del have[path]
            except DatastoreError:
                self._fresh.discard(prefix)  # what etcd holds is unknown now: re-list before the next write
                raise

    def _relist(self, prefix: str, want: Mapping[str, codec.Model], lease: int) -> dict[str, codec.Model]:
        """Delete what is not wanted; return what etcd already holds under our lease (it need not be rewritten)."""
        kvs, _ = self.client.get_prefix(prefix)
        have: dict[str, codec.Model] = {}
        for kv in kvs:
            if kv.key not in want:
                self.client.delete(kv.key)
            elif kv.lease == lease:  # another lease's key (an earlier run's) is rewritten under ours
                with contextlib.suppress(ModelError, k.InvalidKey):  # unreadable: rewritten
                    have[kv.key] = codec.decode(kv.key, kv.value)[1]
        return have


def _logged(write: Callable[[], None], what: str) -> bool:
    try:
        write()
    except DatastoreError as exc:
        log.warning("publishing %s status failed (will retry): %s", what, exc)
        return False
    return True


@dataclass(frozen=True)
class Backoff:
    """Seconds between attempts while etcd fails: doubling from ``first`` up to ``cap``, each scaled by a random
    factor in [1 - jitter, 1 + jitter], so that a cluster's agents do not all retry in step when etcd comes back."""

    first: float = 0.5
    cap: float = 5.0
    jitter: float = 0.2

    def delay(self, failures: int, rand: float) -> float:
        """The wait after the ``failures``-th failure in a row; ``rand`` is uniform in [0, 1)."""
        base = min(self.cap, self.first * 2.0 ** max(0, failures - 1))
        return base * (1.0 - self.jitter + 2.0 * self.jitter * rand)


ROUTES, PEERS = "routes", "peers"
Write = Callable[[], None]  # one kind of status's newest value, bound to its writer


class StatusReporter:
    """The publisher's thread. ``offer_*`` never wait for etcd: they replace what is pending for that kind of status
    (the latest value wins) and return."""

    def __init__(self, publisher: StatusPublisher, backoff: Backoff | None = None) -> None:
        self.publisher = publisher
        self.backoff = backoff or Backoff()
        self._cond = threading.Condition()
        self._pending: dict[str, Write] = {}  # slot -> newest desired value not yet written
        self._latest: dict[str, Write] = {}  # slot -> newest desired value (rewritten if the lease is lost)
        self._writing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failing_since: float | None = None  # monotonic start of the current outage (None: etcd takes writes)
        self.last_error = ""
        publisher.on_lease_lost = self._lease_lost

    def offer_routes(self, routes: Mapping[str, m.RouteStatus]) -> None:
        routes = dict(routes)
        self._offer(ROUTES, lambda: self.publisher.write_routes(routes))

    def offer_peers(self, peers: Mapping[str, m.BGPPeerStatus]) -> None:
        peers = dict(peers)
        self._offer(PEERS, lambda: self.publisher.write_peers(peers))

    def offer_agent(self, status: m.AgentStatus) -> None:
        self._offer(AGENT, lambda: self.publisher.write_agent(status))

    def start(self) -> StatusReporter:
        self._thread = threading.Thread(target=self._run, name=f"status-{self.publisher.node}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop writing (what is pending is dropped: the owner revokes the lease, which removes every key)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def wait_idle(self, timeout: float) -> bool:
        """True once everything offered so far has been written (for tests and benchmarks)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._writing, timeout)

    def _offer(self, slot: str, value: Write) -> None:
        with self._cond:
            self._pending[slot] = value
            self._latest[slot] = value
            self._cond.notify_all()

    def _lease_lost(self) -> None:
        with self._cond:
            for slot, value in self._latest.items():
                self._pending.setdefault(slot, value)
            self._cond.notify_all()

    def _run(self) -> None:
        failures = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._pending) or self._stop.is_set())
                if self._stop.is_set():
                    return
                batch, self._pending = self._pending, {}
                self._writing = True
            left = self._write(batch)
            with self._cond:
                for slot, value in left.items():
                    self._pending.setdefault(slot, value)  # unless a newer value came meanwhile
                self._writing = False
                self._cond.notify_all()
            if left:
                failures += 1
                self._stop.wait(self.backoff.delay(failures, random.random()))
            else:
                failures = 0

    def _write(self, batch: dict[str, Write]) -> dict[str, Write]:
        """Write the batch (routes, peers, then the agent); returns the slots not written."""
        order = [slot for slot in (ROUTES, PEERS, AGENT) if slot in batch]
        for i, slot in enumerate(order):
            if self._stop.is_set():
                return {}
            try:
                batch[slot]()
            except Exception as exc:  # status must never end its thread; a bug is logged by _failed
                self._failed(exc)
                return {s: batch[s] for s in order[i:]}
        self._recovered()
        return {}

    def _failed(self, exc: Exception) -> None:
        self.last_error = str(exc)
        if self.failing_since is not None:
            log.debug("status write failed again: %s", exc)
            return
        self.failing_since = time.monotonic()
        if isinstance(exc, DatastoreError):
            log.warning("status: etcd does not take writes (%s); the dataplane goes on, status is retried", exc)
        else:
            log.exception("status: writing failed; retried with backoff")

    def _recovered(self) -> None:
        if self.failing_since is None:
            return
        log.info(
            "status: etcd takes writes again after %.1f s; status is up to date", time.monotonic() - self.failing_since
        )
        self.failing_since = None
        self.last_error = ""
