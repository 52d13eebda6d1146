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
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from pyetcd import etcdrpc
from pyetcd.etcdrpc import kv_pb2

from datastore.errors import (
    AlreadyExists,
    CasConflict,
    Compacted,
    DatastoreError,
    LeaseLost,
    Stalled,
    TimedOut,
    Unavailable,
)

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
    revision: int  # the member's revision when it sent the batch
    events: tuple[WatchEvent, ...]
    created: bool = False  # the watch's first response


def encode_key(key: str) -> bytes:
    """A key as etcd stores it. ``surrogateescape`` round-trips keys that were not UTF-8 (see ``_kv``)."""
    return key.encode("utf-8", "surrogateescape")


def printable_key(key: str) -> str:
    """A key fit for a log line: bytes that are not UTF-8 shown as ``\\xNN``."""
    return encode_key(key).decode("utf-8", "backslashreplace")


def prefix_end(prefix: str) -> bytes:
    """The first key after every key that starts with ``prefix`` (etcd's range_end for a prefix)."""
    b = bytearray(encode_key(prefix))
    for i in range(len(b) - 1, -1, -1):
        if b[i] < 0xFF:
            b[i] += 1
            return bytes(b[: i + 1])
    return b"\0"


def _kv(raw: Any) -> KV:
    return KV(
        # Anyone with write access can store a key that is not UTF-8; it must reach the watcher (which reports it
        # as malformed) instead of raising here, so its bytes are kept as surrogates.
        key=raw.key.decode("utf-8", "surrogateescape"),
        value=bytes(raw.value),
        mod_revision=raw.mod_revision,
        create_revision=raw.create_revision,
        version=raw.version,
        lease=raw.lease,
    )


# What gRPC says when a TLS handshake fails, by cause (grpcio 1.85, etcd 3.4): our CA did not sign the server's
# certificate; the server rejected our certificate or its absence (it sends a bad_certificate alert, which gRPC
# reports as a decryption failure). A plain-text client meeting a TLS server sees only "Socket closed", which an
# etcd restart also causes, so that gets no hint.
_TLS_SERVER_UNTRUSTED = ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed")
_TLS_CLIENT_REJECTED = ("TSI_DATA_CORRUPTED", "BAD_CERTIFICATE", "CERTIFICATE_REQUIRED")
_TLS_OTHER = ("Tls handshake failed", "Handshake failed", "SSL_ERROR", "TSI_")


def _tls_hint(detail: str, tls: EtcdTLS | None) -> str | None:
    """A sentence naming the TLS problem behind an UNAVAILABLE, or None if it does not look like one. gRPC's own
    words ("Unwrap failed (TSI_DATA_CORRUPTED)") do not tell an operator that a certificate is the problem."""
    if tls is None:
        return None
    if any(m in detail for m in _TLS_SERVER_UNTRUSTED):
        ca = f"the CA in {tls.ca_file}" if tls.ca_file else "the system's CAs"
        return f"TLS handshake failed: etcd's server certificate is not signed by {ca} (or not for this address)"
    if any(m in detail for m in _TLS_CLIENT_REJECTED):
        if tls.cert_file is None:
            return "TLS handshake failed: etcd rejected the connection; it requires a client certificate (none given)"
        return f"TLS handshake failed: etcd rejected the client certificate {tls.cert_file} (not signed by its CA?)"
    if any(m in detail for m in _TLS_OTHER):
        return "TLS handshake failed"
    return None


def translate(exc: grpc.RpcError, tls: EtcdTLS | None = None) -> DatastoreError:
    """Map a gRPC error to podnet's hierarchy (``tls``: what the channel used, to explain handshake failures)."""
    code = exc.code() if hasattr(exc, "code") else None
    detail = exc.details() if hasattr(exc, "details") else str(exc)
    # The deadline travels with the call, so etcd often gives up first and says so with code UNKNOWN.
    if code == grpc.StatusCode.DEADLINE_EXCEEDED or "context deadline exceeded" in (detail or ""):
        return TimedOut(f"etcd did not answer in time: {detail}")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        hint = _tls_hint(detail or "", tls)
        return Unavailable(f"etcd unavailable: {hint} ({detail})" if hint else f"etcd unavailable: {detail}")
    if code == grpc.StatusCode.OUT_OF_RANGE and "compacted" in (detail or ""):
        return Compacted(0)
    if code == grpc.StatusCode.NOT_FOUND and "lease" in (detail or ""):
        return LeaseLost(detail or "lease not found")
    return DatastoreError(f"etcd error {code}: {detail}")


# gRPC keepalive: a member that hangs (SIGSTOP, a wedged disk) keeps its TCP connections open, so without pings a
# stream on it waits forever. etcd refuses pings more often than every 5 s (--grpc-keepalive-min-time) and answers
# too many with GOAWAY, hence 6 s; a dead transport is noticed within 6 + 4 s and fails every call on it. Pings
# without calls are off: etcd's enforcement policy does not permit them and sends GOAWAY "too_many_pings" after
# two (seen here), and an idle channel has nothing to protect: the next call has its own deadline.
KEEPALIVE_TIME_MS = 6000
KEEPALIVE_TIMEOUT_MS = 4000
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 0),
    # A quiet watch sends no data; gRPC's default stops pinging after two pings without data.
    ("grpc.http2.max_pings_without_data", 0),
    # Snapshots are read in pages (PAGE_KEYS) so a response stays far below this; one watch response can still
    # carry a large transaction's events, and gRPC's 4 MiB default would then fail the watch forever.
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]
# Keys per page of a prefix read: 50 000 endpoints are ~19 MB in one response (over gRPC's 4 MiB default, and a
# 19 MB burst of memory); pages of 2 000 keys at one pinned revision are ~1 MB each and read the same snapshot.
PAGE_KEYS = 2000

# Ask the member to refuse (and to cancel our watches) when it has no leader: a member cut off from the quorum
# otherwise serves a watch that never delivers again. This is what etcd's own client does (WithRequireLeader).
REQUIRE_LEADER = (("hasleader", "true"),)

# A watch stream that has said nothing for WATCH_PROGRESS_AFTER seconds is asked for a progress notification; one
# that stays silent for WATCH_STALL_AFTER seconds is declared stalled. Both count only while someone waits on the
# stream, so a slow consumer is never mistaken for a hung member.
WATCH_PROGRESS_AFTER = 5.0
WATCH_STALL_AFTER = 10.0


@dataclass(frozen=True)
class EtcdTLS:
    """TLS towards etcd: the CA that signs its server certificates (None: the system's roots) and this client's
    certificate and key (both or neither; etcd started with --client-cert-auth requires them)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("etcd TLS: a client certificate needs its key and a key its certificate (give both)")

    def credentials(self) -> grpc.ChannelCredentials:
        """Read the files now (a missing or unreadable one is named in the error) into gRPC's credentials."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read_pem(self.ca_file, "CA"),
            private_key=_read_pem(self.key_file, "client key"),
            certificate_chain=_read_pem(self.cert_file, "client certificate"),
        )


def _read_pem(path: Path | str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"etcd TLS {what} file {path}: {exc.strerror or exc}") from None
    # gRPC takes any bytes here and fails much later, at the handshake, with a message that names no file.
    if b"-----BEGIN " not in data:
        raise ValueError(f"etcd TLS {what} file {path}: not a PEM file")
    return data


def endpoint_target(endpoint: str, tls: bool) -> str:
    """``host:port`` from an endpoint given as ``host:port``, ``http://host:port`` or ``https://host:port``; a
    scheme that contradicts ``tls`` is refused rather than silently speaking the other protocol."""
    if endpoint.startswith("https://"):
        if not tls:
            raise ValueError(f"etcd endpoint {endpoint} is https:// but no etcd TLS files (CA/cert/key) are set")
        return endpoint.removeprefix("https://")
    if endpoint.startswith("http://"):
        if tls:
            raise ValueError(f"etcd endpoint {endpoint} is plain http:// but etcd TLS files are set (use https://)")
        return endpoint.removeprefix("http://")
    return endpoint


class _Member:
    """One endpoint's channel and stubs. Its channel stays open while the client lives: a failed call on one
    member must not tear down the streams other watches have on it (they notice their own failures)."""

    def __init__(
        self, target: str, tls: EtcdTLS | None = None, credentials: grpc.ChannelCredentials | None = None
    ) -> None:
        self.target = target
        self.tls = tls
        if credentials is None:
            self.channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        else:
            self.channel = grpc.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
        self.kv = etcdrpc.KVStub(self.channel)
        self.watch = etcdrpc.WatchStub(self.channel)
        self.lease = etcdrpc.LeaseStub(self.channel)


class EtcdClient:
    """A small, typed etcd v3 client. Thread-safe (gRPC channels are).

    With several endpoints, calls go to one member at a time; a call that finds it unavailable (or gets no answer in
    time) moves later calls to the next member. Idempotent reads are retried once there. Only the calls and watches
    that failed move: every other stream stays where it is until it fails on its own.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        timeout: float = DEFAULT_TIMEOUT,
        watch_progress_after: float = WATCH_PROGRESS_AFTER,
        watch_stall_after: float = WATCH_STALL_AFTER,
        tls: EtcdTLS | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is required")
        self.endpoints = [endpoint_target(e, tls is not None) for e in endpoints]
        self.tls = tls
        self._credentials = tls.credentials() if tls is not None else None
        self.timeout = timeout
        self.watch_progress_after = watch_progress_after
        self.watch_stall_after = watch_stall_after
        self.failovers = 0  # times calls moved to another member
        self.stalls = 0  # watch streams declared stalled
        self._index = 0
        self._lock = threading.Lock()
        self._members: dict[int, _Member] = {}
        self._monitor = _StreamMonitor()
        self._closed = False

    @property
    def endpoint(self) -> str:
        """The member calls go to now."""
        return self.endpoints[self._index]

    def _current(self) -> tuple[int, _Member]:
        with self._lock:
            if self._closed:
                raise Unavailable("etcd client closed")
            i = self._index
            member = self._members.get(i)
            if member is None:
                member = self._members[i] = _Member(self.endpoints[i], self.tls, self._credentials)
            return i, member

    def _failed(self, index: int, err: DatastoreError) -> None:
        """A call or stream on member ``index`` failed: move on, unless someone already has (so that nine watches
        failing together move once, not nine times around the ring)."""
        if len(self.endpoints) < 2:
            return
        with self._lock:
            if self._index != index:
                return
            self._index = (index + 1) % len(self.endpoints)
            self.failovers += 1
            moved_to = self.endpoints[self._index]
        log.warning("etcd %s: %s; moving to %s", self.endpoints[index], err, moved_to)

    def _call(self, rpc: Callable[[_Member], Callable[..., Any]], request: Any, idempotent: bool = False) -> Any:
        attempts = 2 if idempotent and len(self.endpoints) > 1 else 1
        for attempt in range(attempts):
            index, member = self._current()
            try:
                return rpc(member)(request, timeout=self.timeout, metadata=REQUIRE_LEADER)
            except grpc.RpcError as exc:
                err = translate(exc, member.tls)
                if isinstance(err, Unavailable):
                    self._failed(index, err)
                    if attempt + 1 < attempts:
                        continue
                raise err from None
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            members, self._members = list(self._members.values()), {}
        self._monitor.close()
        for member in members:
            member.channel.close()

    def __enter__(self) -> EtcdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- reads -------------------------------------------------------------------------------------------

    def get(self, key: str, revision: int = 0) -> KV | None:
        resp = self._call(
            lambda m: m.kv.Range, etcdrpc.RangeRequest(key=encode_key(key), revision=revision), idempotent=True
        )
        return _kv(resp.kvs[0]) if resp.kvs else None

    def get_prefix(self, prefix: str, revision: int = 0, page: int = PAGE_KEYS) -> tuple[list[KV], int]:
        """Every key under ``prefix`` (sorted), and the revision the read was served at. Read in pages of ``page``
        keys, every page at the revision of the first, so the result is one consistent snapshot however large."""
        out: list[KV] = []
        start = encode_key(prefix)
        end = prefix_end(prefix)
        while True:
            req = etcdrpc.RangeRequest(
                key=start,
                range_end=end,
                revision=revision,
                limit=page,
                sort_order=etcdrpc.RangeRequest.ASCEND,
                sort_target=etcdrpc.RangeRequest.KEY,
            )
            try:
                resp = self._call(lambda m: m.kv.Range, req, idempotent=True)
            except DatastoreError as exc:
                if "compacted" in str(exc):
                    raise Compacted(0) from None
                raise
            if revision == 0:
                revision = int(resp.header.revision)  # later pages read the same snapshot
            out += [_kv(x) for x in resp.kvs]
            if not resp.more or not resp.kvs:
                return out, revision
            start = bytes(resp.kvs[-1].key) + b"\0"

    def revision(self) -> int:
        req = etcdrpc.RangeRequest(key=b"\0", count_only=True)
        resp = self._call(lambda m: m.kv.Range, req, idempotent=True)
        return int(resp.header.revision)

    # --- writes ------------------------------------------------------------------------------------------

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        resp = self._call(lambda m: m.kv.Put, etcdrpc.PutRequest(key=encode_key(key), value=value, lease=lease))
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
            resp = self._call(lambda m: m.kv.DeleteRange, etcdrpc.DeleteRangeRequest(key=encode_key(key)))
            return bool(resp.deleted)
        result = self.txn([ModRevisionIs(key, mod_revision)], [Delete(key)])
        if not result.succeeded:
            raise CasConflict(f"{key} changed since revision {mod_revision}")
        return True

    def delete_prefix(self, prefix: str) -> int:
        req = etcdrpc.DeleteRangeRequest(key=encode_key(prefix), range_end=prefix_end(prefix))
        return int(self._call(lambda m: m.kv.DeleteRange, req).deleted)

    def txn(self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        req = etcdrpc.TxnRequest(
            compare=[_compare(c) for c in compare],
            success=[_op(o) for o in success],
            failure=[_op(o) for o in failure],
        )
        resp = self._call(lambda m: m.kv.Txn, req)
        return TxnResult(succeeded=bool(resp.succeeded), revision=int(resp.header.revision))

    def compact(self, revision: int) -> None:
        self._call(lambda m: m.kv.Compact, etcdrpc.CompactionRequest(revision=revision, physical=True))

    # --- leases ------------------------------------------------------------------------------------------

    def grant(self, ttl: int) -> int:
        resp = self._call(lambda m: m.lease.LeaseGrant, etcdrpc.LeaseGrantRequest(TTL=ttl))
        if resp.error:
            raise DatastoreError(f"lease grant failed: {resp.error}")
        return int(resp.ID)

    def keepalive_once(self, lease: int) -> int:
        """Refresh a lease; returns the new TTL. Raises ``LeaseLost`` if it has already expired."""
        index, member = self._current()
        try:
            responses = member.lease.LeaseKeepAlive(
                iter([etcdrpc.LeaseKeepAliveRequest(ID=lease)]), timeout=self.timeout, metadata=REQUIRE_LEADER
            )
            ttl = 0
            for resp in responses:
                ttl = int(resp.TTL)
                break
        except grpc.RpcError as exc:
            err = translate(exc, member.tls)
            if isinstance(err, Unavailable):
                self._failed(index, err)
            raise err from None
        if ttl <= 0:
            raise LeaseLost(f"lease {lease:x} has expired")
        return ttl

    def revoke(self, lease: int) -> None:
        try:
            self._call(lambda m: m.lease.LeaseRevoke, etcdrpc.LeaseRevokeRequest(ID=lease))
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
        index, member = self._current()
        stream = WatchStream(member, prefix, start_revision, self.watch_progress_after, self.watch_stall_after)
        stream.on_failure = lambda err: self._stream_failed(index, err)
        self._monitor.add(stream)
        return stream

    def _stream_failed(self, index: int, err: DatastoreError) -> None:
        if isinstance(err, Stalled):
            with self._lock:
                self.stalls += 1
        self._failed(index, err)


def _compare(c: Compare) -> Any:
    if isinstance(c, ModRevisionIs):
        return etcdrpc.Compare(
            key=encode_key(c.key),
            result=etcdrpc.Compare.EQUAL,
            target=etcdrpc.Compare.MOD,
            mod_revision=c.revision,
        )
    return etcdrpc.Compare(
        key=encode_key(c.key), result=etcdrpc.Compare.EQUAL, target=etcdrpc.Compare.VALUE, value=c.value
    )


def _op(o: Op) -> Any:
    if isinstance(o, Put):
        return etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=encode_key(o.key), value=o.value, lease=o.lease))
    req = etcdrpc.DeleteRangeRequest(key=encode_key(o.key))
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
    """One etcd watch on a prefix from a start revision. Iterate for ``WatchBatch``es (an empty one for the creation
    and for each progress notification); the iterator raises ``Compacted`` when the start revision is gone,
    ``Stalled`` when the stream stopped answering, and ``Unavailable`` when it breaks. ``cancel`` from any thread
    ends the iteration."""

    def __init__(
        self, member: _Member, prefix: str, start_revision: int, progress_after: float, stall_after: float
    ) -> None:
        self.endpoint = member.target
        self.tls = member.tls
        self.progress_after = progress_after
        self.stall_after = stall_after
        self.on_failure: Callable[[DatastoreError], None] | None = None
        self.on_close: Callable[[WatchStream], None] | None = None
        self.progress_requests = 0
        self._requests: queue.Queue[Any] = queue.Queue()
        create = etcdrpc.WatchCreateRequest(
            key=encode_key(prefix),
            range_end=prefix_end(prefix),
            start_revision=start_revision,
            progress_notify=True,
        )
        self._requests.put(etcdrpc.WatchRequest(create_request=create))
        self._call: Any = member.watch.Watch(self._request_iter(), metadata=REQUIRE_LEADER)
        self._cancelled = False
        self._stalled = False
        # Monotonic time since which the reader has been waiting for the next response (None: not waiting), and
        # when it last asked for progress. Written by the reader, read by the monitor thread.
        self._waiting_since: float | None = time.monotonic()
        self._asked_at = 0.0

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
        if self.on_close is not None:
            self.on_close(self)

    def check(self, now: float) -> None:
        """Called by the monitor: ask a silent stream for progress, and give up on one that stays silent."""
        since = self._waiting_since
        if since is None or self._cancelled or self._stalled:
            return
        silent = now - since
        if silent >= self.stall_after:
            self._stalled = True
            self._call.cancel()
        elif silent >= self.progress_after and self._asked_at < since:
            # etcd (>= 3.4) answers with a progress notification carrying its current revision.
            self._asked_at = now
            self.progress_requests += 1
            self._requests.put(etcdrpc.WatchRequest(progress_request=etcdrpc.WatchProgressRequest()))

    def __iter__(self) -> Iterator[WatchBatch]:
        try:
            yield from self._read()
        except DatastoreError as err:
            if isinstance(err, Unavailable) and self.on_failure is not None:
                self.on_failure(err)
            raise
        finally:
            self._waiting_since = None
            if self.on_close is not None:
                self.on_close(self)

    def _read(self) -> Iterator[WatchBatch]:
        responses = iter(self._call)
        while True:
            self._waiting_since = time.monotonic()
            try:
                resp = next(responses)
            except StopIteration:
                break
            except grpc.RpcError as exc:
                if self._stalled:
                    raise Stalled(f"watch on {self.endpoint} silent for {self.stall_after:.0f}s") from None
                if self._cancelled:
                    return
                raise translate(exc, self.tls) from None
            self._waiting_since = None
            if resp.compact_revision:
                raise Compacted(int(resp.compact_revision))
            if resp.canceled:
                raise Unavailable(f"watch cancelled by etcd: {resp.cancel_reason}")
            events = tuple(
                WatchEvent("delete" if ev.type == kv_pb2.Event.DELETE else "put", _kv(ev.kv)) for ev in resp.events
            )
            yield WatchBatch(revision=int(resp.header.revision), events=events, created=bool(resp.created))
        if self._stalled:
            raise Stalled(f"watch on {self.endpoint} silent for {self.stall_after:.0f}s")
        if not self._cancelled:
            raise Unavailable("watch stream ended")


class _StreamMonitor:
    """One thread per client that checks its open watch streams twice a second (started with the first watch)."""

    TICK = 0.5

    def __init__(self) -> None:
        self._streams: set[WatchStream] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, stream: WatchStream) -> None:
        stream.on_close = self._remove
        with self._lock:
            self._streams.add(stream)
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="etcd-watch-monitor", daemon=True)
                self._thread.start()

    def _remove(self, stream: WatchStream) -> None:
        with self._lock:
            self._streams.discard(stream)

    def _run(self) -> None:
        while not self._stop.wait(self.TICK):
            with self._lock:
                streams = list(self._streams)
            now = time.monotonic()
            for stream in streams:
                stream.check(now)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2)
