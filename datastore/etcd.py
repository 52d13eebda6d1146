"""The etcd v3 client wrapper: the only module that speaks gRPC to etcd.

It drives the generated etcd v3 stubs shipped by ``etcd-sdk-python`` (module ``pyetcd``) directly, rather than that
package's convenience client, for three reasons measured or read here: the convenience client marks an endpoint
failed for 300 s after one UNAVAILABLE (an etcd restart would leave podnet deaf for five minutes), it drops the
response header revision that snapshot-then-watch needs, and its errors are not the hierarchy podnet wants.
Every gRPC error is translated into ``datastore.errors`` here.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from pyetcd import etcdrpc
from pyetcd.etcdrpc import kv_pb2

from datastore.errors import AlreadyExists, CasConflict, Compacted, DatastoreError, LeaseLost, Unavailable

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0


@dataclass(frozen=True)
class KV:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    version: int
    lease: int


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: str
    prefix: bool = False


@dataclass(frozen=True)
class ModRevisionIs:
    """Compare: the key's mod_revision equals ``revision`` (0 = the key does not exist)."""

    key: str
    revision: int


@dataclass(frozen=True)
class ValueIs:
    key: str
    value: bytes


Op = Put | Delete
Compare = ModRevisionIs | ValueIs


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int


@dataclass(frozen=True)
class WatchEvent:
    type: str  # "put" | "delete"
    kv: KV


@dataclass(frozen=True)
class WatchBatch:
    revision: int
    events: tuple[WatchEvent, ...]


def prefix_end(prefix: str) -> bytes:
    """The first key after every key that starts with ``prefix`` (etcd's range_end for a prefix)."""
    b = bytearray(prefix.encode())
    for i in range(len(b) - 1, -1, -1):
        if b[i] < 0xFF:
            b[i] += 1
            return bytes(b[: i + 1])
    return b"\0"


def _kv(raw: Any) -> KV:
    return KV(
        key=raw.key.decode(),
        value=bytes(raw.value),
        mod_revision=raw.mod_revision,
        create_revision=raw.create_revision,
        version=raw.version,
        lease=raw.lease,
    )


def translate(exc: grpc.RpcError) -> DatastoreError:
    """Map a gRPC error to podnet's hierarchy."""
    code = exc.code() if hasattr(exc, "code") else None
    detail = exc.details() if hasattr(exc, "details") else str(exc)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return Unavailable(f"etcd unavailable: {detail}")
    if code == grpc.StatusCode.OUT_OF_RANGE and "compacted" in (detail or ""):
        return Compacted(0)
    if code == grpc.StatusCode.NOT_FOUND and "lease" in (detail or ""):
        return LeaseLost(detail or "lease not found")
    return DatastoreError(f"etcd error {code}: {detail}")


class EtcdClient:
    """A small, typed etcd v3 client. Thread-safe (gRPC channels are)."""

    def __init__(self, endpoints: Sequence[str], timeout: float = DEFAULT_TIMEOUT) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is required")
        self.endpoints = [e.removeprefix("http://") for e in endpoints]
        self.timeout = timeout
        self._index = 0
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._open()

    def _open(self) -> None:
        target = self.endpoints[self._index % len(self.endpoints)]
        self._channel = grpc.insecure_channel(
            target,
            options=[("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)],
        )
        self._kv_stub = etcdrpc.KVStub(self._channel)
        self._watch_stub = etcdrpc.WatchStub(self._channel)
        self._lease_stub = etcdrpc.LeaseStub(self._channel)
        self._maint_stub = etcdrpc.MaintenanceStub(self._channel)

    def _failover(self) -> None:
        """Move to the next endpoint after an Unavailable (only matters with several endpoints)."""
        if len(self.endpoints) < 2:
            return
        with self._lock:
            old = self._channel
            self._index += 1
            self._open()
        if old is not None:
            old.close()

    def _call(self, fn: Callable[..., Any], request: Any) -> Any:
        try:
            return fn(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            err = translate(exc)
            if isinstance(err, Unavailable):
                self._failover()
            raise err from None

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()

    def __enter__(self) -> EtcdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- reads -------------------------------------------------------------------------------------------

    def get(self, key: str, revision: int = 0) -> KV | None:
        resp = self._call(self._kv_stub.Range, etcdrpc.RangeRequest(key=key.encode(), revision=revision))
        return _kv(resp.kvs[0]) if resp.kvs else None

    def get_prefix(self, prefix: str, revision: int = 0) -> tuple[list[KV], int]:
        """Every key under ``prefix`` (sorted), and the revision the read was served at."""
        req = etcdrpc.RangeRequest(
            key=prefix.encode(),
            range_end=prefix_end(prefix),
            revision=revision,
            sort_order=etcdrpc.RangeRequest.ASCEND,
            sort_target=etcdrpc.RangeRequest.KEY,
        )
        try:
            resp = self._call(self._kv_stub.Range, req)
        except DatastoreError as exc:
            if "compacted" in str(exc):
                raise Compacted(0) from None
            raise
        return [_kv(x) for x in resp.kvs], resp.header.revision

    def revision(self) -> int:
        resp = self._call(self._kv_stub.Range, etcdrpc.RangeRequest(key=b"\0", count_only=True))
        return int(resp.header.revision)

    # --- writes ------------------------------------------------------------------------------------------

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        resp = self._call(self._kv_stub.Put, etcdrpc.PutRequest(key=key.encode(), value=value, lease=lease))
        return int(resp.header.revision)

    def create(self, key: str, value: bytes, lease: int = 0) -> int:
        """Write only if the key does not exist; raises ``AlreadyExists`` otherwise."""
        result = self.txn([ModRevisionIs(key, 0)], [Put(key, value, lease)])
        if not result.succeeded:
            raise AlreadyExists(f"{key} already exists")
        return result.revision

    def cas(self, key: str, value: bytes, mod_revision: int, lease: int = 0) -> int:
        """Write only if the key's mod_revision is still ``mod_revision`` (0: still absent)."""
        result = self.txn([ModRevisionIs(key, mod_revision)], [Put(key, value, lease)])
        if not result.succeeded:
            raise CasConflict(f"{key} changed since revision {mod_revision}")
        return result.revision

    def delete(self, key: str, mod_revision: int | None = None) -> bool:
        """Delete one key; with ``mod_revision``, only if unchanged (raises ``CasConflict``). True if deleted."""
        if mod_revision is None:
            resp = self._call(self._kv_stub.DeleteRange, etcdrpc.DeleteRangeRequest(key=key.encode()))
            return bool(resp.deleted)
        result = self.txn([ModRevisionIs(key, mod_revision)], [Delete(key)])
        if not result.succeeded:
            raise CasConflict(f"{key} changed since revision {mod_revision}")
        return True

    def delete_prefix(self, prefix: str) -> int:
        req = etcdrpc.DeleteRangeRequest(key=prefix.encode(), range_end=prefix_end(prefix))
        return int(self._call(self._kv_stub.DeleteRange, req).deleted)

    def txn(self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        req = etcdrpc.TxnRequest(
            compare=[_compare(c) for c in compare],
            success=[_op(o) for o in success],
            failure=[_op(o) for o in failure],
        )
        resp = self._call(self._kv_stub.Txn, req)
        return TxnResult(succeeded=bool(resp.succeeded), revision=int(resp.header.revision))

    def compact(self, revision: int) -> None:
        self._call(self._kv_stub.Compact, etcdrpc.CompactionRequest(revision=revision, physical=True))

    # --- leases ------------------------------------------------------------------------------------------

    def grant(self, ttl: int) -> int:
        resp = self._call(self._lease_stub.LeaseGrant, etcdrpc.LeaseGrantRequest(TTL=ttl))
        if resp.error:
            raise DatastoreError(f"lease grant failed: {resp.error}")
        return int(resp.ID)

    def keepalive_once(self, lease: int) -> int:
        """Refresh a lease; returns the new TTL. Raises ``LeaseLost`` if it has already expired."""
        try:
            responses = self._lease_stub.LeaseKeepAlive(
                iter([etcdrpc.LeaseKeepAliveRequest(ID=lease)]), timeout=self.timeout
            )
            ttl = 0
            for resp in responses:
                ttl = int(resp.TTL)
                break
        except grpc.RpcError as exc:
            err = translate(exc)
            if isinstance(err, Unavailable):
                self._failover()
            raise err from None
        if ttl <= 0:
            raise LeaseLost(f"lease {lease:x} has expired")
        return ttl

    def revoke(self, lease: int) -> None:
        try:
            self._call(self._lease_stub.LeaseRevoke, etcdrpc.LeaseRevokeRequest(ID=lease))
        except LeaseLost:
            pass
        except DatastoreError as exc:
            if "not found" not in str(exc):
                raise

    def lease(self, ttl: int, on_lost: Callable[[], None] | None = None) -> LeaseKeeper:
        """Grant a lease and keep it alive from a background thread until ``LeaseKeeper.close``."""
        return LeaseKeeper(self, ttl, on_lost)

    # --- watch -------------------------------------------------------------------------------------------

    def watch_prefix(self, prefix: str, start_revision: int) -> WatchStream:
        return WatchStream(self, prefix, start_revision)


def _compare(c: Compare) -> Any:
    if isinstance(c, ModRevisionIs):
        return etcdrpc.Compare(
            key=c.key.encode(),
            result=etcdrpc.Compare.EQUAL,
            target=etcdrpc.Compare.MOD,
            mod_revision=c.revision,
        )
    return etcdrpc.Compare(
        key=c.key.encode(), result=etcdrpc.Compare.EQUAL, target=etcdrpc.Compare.VALUE, value=c.value
    )


def _op(o: Op) -> Any:
    if isinstance(o, Put):
        return etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=o.key.encode(), value=o.value, lease=o.lease))
    req = etcdrpc.DeleteRangeRequest(key=o.key.encode())
    if o.prefix:
        req.range_end = prefix_end(o.key)
    return etcdrpc.RequestOp(request_delete_range=req)


class LeaseKeeper:
    """A lease refreshed every third of its TTL. ``on_lost`` runs once if it expires (e.g. etcd was down too long);
    keys written under it are gone by then, so the owner must re-grant and re-publish."""

    def __init__(self, client: EtcdClient, ttl: int, on_lost: Callable[[], None] | None) -> None:
        self.client = client
        self.ttl = ttl
        self.id = client.grant(ttl)
        self._on_lost = on_lost
        self._stop = threading.Event()
        self.lost = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{self.id:x}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        interval = max(self.ttl / 3.0, 0.2)
        while not self._stop.wait(interval):
            try:
                self.client.keepalive_once(self.id)
            except LeaseLost:
                log.warning("lease %x lost", self.id)
                self.lost.set()
                if self._on_lost is not None:
                    self._on_lost()
                return
            except DatastoreError as exc:
                log.debug("lease %x keepalive failed (will retry): %s", self.id, exc)

    def close(self, revoke: bool = True) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if revoke and not self.lost.is_set():
            try:
                self.client.revoke(self.id)
            except DatastoreError as exc:
                log.debug("revoking lease %x: %s", self.id, exc)


class WatchStream:
    """One etcd watch on a prefix from a start revision. Iterate for ``WatchBatch``es; the iterator raises
    ``Compacted`` when the start revision is gone and ``Unavailable`` when the stream breaks. ``cancel`` from any
    thread ends the iteration."""

    def __init__(self, client: EtcdClient, prefix: str, start_revision: int) -> None:
        self._requests: queue.Queue[Any] = queue.Queue()
        create = etcdrpc.WatchCreateRequest(
            key=prefix.encode(), range_end=prefix_end(prefix), start_revision=start_revision, progress_notify=True
        )
        self._requests.put(etcdrpc.WatchRequest(create_request=create))
        self._call: Any = client._watch_stub.Watch(self._request_iter())
        self._cancelled = False

    def _request_iter(self) -> Iterator[Any]:
        while True:
            item = self._requests.get()
            if item is None:
                return
            yield item

    def cancel(self) -> None:
        self._cancelled = True
        self._requests.put(None)
        self._call.cancel()

    def __iter__(self) -> Iterator[WatchBatch]:
        try:
            for resp in self._call:
                if resp.compact_revision:
                    raise Compacted(int(resp.compact_revision))
                if resp.canceled:
                    raise Unavailable(f"watch cancelled by etcd: {resp.cancel_reason}")
                if resp.created and not resp.events:
                    continue
                events = tuple(
                    WatchEvent("delete" if ev.type == kv_pb2.Event.DELETE else "put", _kv(ev.kv)) for ev in resp.events
                )
                yield WatchBatch(revision=int(resp.header.revision), events=events)
        except grpc.RpcError as exc:
            if self._cancelled:
                return
            raise translate(exc) from None
        if not self._cancelled:
            raise Unavailable("watch stream ended")
