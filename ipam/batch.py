"""Group commit of concurrent allocations for one node (the CNI server's ADDs).

Allocations for one node all land in the node's block, so they cannot usefully run in parallel: each would
compare the block's revision and all but one would lose. The server used to serialise them behind a per-node lock,
one etcd transaction each; with 10 ADDs in flight the wait for that lock was most of an ADD's time in the server
(p50 25 ms of 34, measured). Here a thread that gets the node's lock commits every allocation queued meanwhile in
one transaction (``Ipam.auto_assign_batch``); requests that do not fit or lose a compare go through the ordinary
``Ipam.auto_assign`` (claims, borrowing, retries, idempotency), still under the lock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from ipam.allocator import Ipam

MAX_BATCH = 50  # etcd allows 128 operations per transaction: one per handle, one per block


@dataclass(eq=False)
class _Request:
    handle: str
    pod: str | None
    done: threading.Event = field(default_factory=threading.Event)
    ip: str | None = None
    error: Exception | None = None


class GroupAllocator:
    """Thread-safe front of one ``Ipam`` for concurrent callers on a node."""

    def __init__(self, ipam: Ipam) -> None:
        self.ipam = ipam
        self._mu = threading.Lock()
        self._node_locks: dict[str, threading.Lock] = {}
        self._queues: dict[tuple[str, str | None], list[_Request]] = {}

    @contextmanager
    def node_lock(self, node: str) -> Iterator[None]:
        """Exclusive use of ``node``'s blocks (for an allocation that does not go through ``auto_assign``)."""
        with self._mu:
            lock = self._node_locks.setdefault(node, threading.Lock())
        with lock:
            yield

    def auto_assign(self, handle: str, node: str, *, pod: str | None = None, pool: str | None = None) -> str:
        """Same contract as ``Ipam.auto_assign`` for a pod allocation."""
        req = _Request(handle, pod)
        key = (node, pool)
        with self._mu:
            self._queues.setdefault(key, []).append(req)
        with self.node_lock(node):
            # Whoever held the lock before may have committed this request already; else lead the next batch.
            while not req.done.is_set():
                with self._mu:
                    queue = self._queues[key]
                    batch, queue[:] = queue[:MAX_BATCH], queue[MAX_BATCH:]
                self._commit(batch, node, pool)
        if req.error is not None:
            raise req.error
        assert req.ip is not None
        return req.ip

    def _commit(self, batch: list[_Request], node: str, pool: str | None) -> None:
        requests = [(r.handle, r.pod) for r in batch]
        got: dict[str, str] = {}
        try:
            # A lost compare is usually a block another writer (a DEL's release, another process) changed: one
            # more try on fresh blocks keeps the batch whole. A handle that exists already fails both times.
            for refresh in (False, True):
                got = self.ipam.auto_assign_batch(requests, node, pool=pool, refresh=refresh) if batch else {}
                if got:
                    break
        except Exception:  # the one-by-one path below reports each request's own error
            got = {}
        for r in batch:
            try:
                r.ip = got.get(r.handle) or self.ipam.auto_assign(r.handle, node, pod=r.pod, pool=pool)
            except Exception as exc:  # handed to the request's own thread, which raises it
                r.error = exc
            r.done.set()
