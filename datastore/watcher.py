"""Snapshot-then-watch over a key prefix, giving consumers a consistent stream of typed updates.

The watcher reads the whole prefix at revision N, emits every object, emits ``InSync(N)``, then watches from N+1.
When the stream breaks (a disconnect, a hung or partitioned member, an etcd restart) it resumes the watch from the
last revision it delivered, on whichever member the client has moved to: nothing is re-read. Only when that
revision has been compacted away (or the store went back in time) does it take a new snapshot, and then it emits only
the differences from what the consumer already has, followed by a new ``InSync``: no missed update, no phantom
delete. So a failover costs the watches that failed one new stream each, not a re-list of the cluster.

Values are decoded with ``datastore.codec``. A malformed value (or key) is logged with its key and reported as
``Malformed``: whatever valid object the key held is gone, and a consumer for whom "missing" would open something (a
policy) can fail closed instead. Deleting a malformed key gives a ``Deleted`` (with ``key`` None when the key itself
does not parse). Anything else unexpected about one key (bytes that are not UTF-8, the consumer raising on it) is
treated the same way: logged with the key, reported as malformed, and the watch goes on.

For liveness, ``alive()`` says whether the thread still runs and ``last_progress`` when the stream last said
anything (an event, a progress notification or a snapshot); etcd is asked for progress on a silent stream (see
``datastore.etcd``), so a healthy watch refreshes it every few seconds even when nothing changes.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from datastore import codec, keys
from datastore.errors import Compacted, DatastoreError, Stalled
from datastore.etcd import KV, EtcdClient, WatchStream, printable_key
from datastore.fields import ModelError
from datastore.keys import InvalidKey, Key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Updated:
    key: Key
    path: str
    value: codec.Model
    mod_revision: int


@dataclass(frozen=True)
class Deleted:
    key: Key | None  # None: a malformed key (it was reported as ``Malformed``) is gone
    path: str
    mod_revision: int


@dataclass(frozen=True)
class Malformed:
    """``path`` holds a value (or is a key) that cannot be read; any valid object it held before is gone."""

    key: Key | None  # None when the key itself does not parse
    path: str
    reason: str
    mod_revision: int


@dataclass(frozen=True)
class InSync:
    """Everything up to ``revision`` has been delivered."""

    revision: int


Update = Updated | Deleted | Malformed | InSync
Sink = Callable[[Update], None]


@dataclass(frozen=True)
class _Seen:
    mod_revision: int
    valid: bool
    key: Key | None


def _is_utf8(path: str) -> bool:
    """False for a key whose bytes were not UTF-8 (``datastore.etcd`` keeps them as surrogates)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Rewound(Exception):
    """The member's store is older than what the consumer has already seen (etcd restored or wiped)."""


class Watcher:
    """Watch one prefix and feed ``sink``. Run ``run()`` in a thread of your own, or use ``start()``."""

    def __init__(
        self,
        client: EtcdClient,
        prefix: str,
        sink: Sink,
        retry_delay: float = 0.2,
        max_retry_delay: float = 5.0,
        *,
        log_retries: bool = True,
    ) -> None:
        """``log_retries=False``: each failed attempt is logged at debug level only; the owner reports the outage
        (``failing``) once for all its watches (the agent's datastore component)."""
        self.client = client
        self.log_retries = log_retries
        self.failing: str | None = None  # why the last attempt failed, until one succeeds
        self.prefix = prefix
        self.sink = sink
        self.retry_delay = retry_delay
        self.max_retry_delay = max_retry_delay
        # Counters (read by tests and /metrics).
        self.snapshots = 0  # snapshots taken: 1 + one per compaction or rewind
        self.compactions = 0  # times the watch found its resume revision compacted
        self.reconnects = 0  # watch streams re-opened (resumed) after one broke
        self.stalls = 0  # streams given up on because they stopped answering
        self.errors = 0  # unexpected problems with one key or in the loop, logged
        self.malformed: dict[str, str] = {}  # path -> reason, for keys currently skipped
        self.last_progress = time.monotonic()
        self.revision = 0  # everything up to here has been delivered
        self._seen: dict[str, _Seen] = {}
        self._stop = threading.Event()
        self._stream: WatchStream | None = None
        self._thread: threading.Thread | None = None
        self._failures = 0  # consecutive failed attempts, for the backoff

    def start(self) -> Watcher:
        self._thread = threading.Thread(target=self.run, name=f"watch:{self.prefix}", daemon=True)
        self._thread.start()
        return self

    def alive(self) -> bool:
        """The watch thread is running (False once stopped, or if it died)."""
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()
        stream = self._stream
        if stream is not None:
            stream.cancel()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def run(self) -> None:
        need_snapshot = True
        while not self._stop.is_set():
            try:
                resumed = not need_snapshot
                if need_snapshot:
                    self._resync()
                    need_snapshot = False
                self._watch_from(self.revision + 1, resumed)
            except Compacted as exc:
                self.compactions += 1
                need_snapshot = True
                log.info("watch %s: history compacted (%s); taking a new snapshot", self.prefix, exc)
            except _Rewound as exc:
                need_snapshot = True
                log.warning("watch %s: %s; taking a new snapshot", self.prefix, exc)
            except DatastoreError as exc:
                if self._stop.is_set():
                    return
                if isinstance(exc, Stalled):
                    self.stalls += 1
                self._backoff(exc)
            except Exception:
                # A bug of ours must not end the thread silently; start over from a snapshot.
                self.errors += 1
                log.exception("watch %s: unexpected error; taking a new snapshot", self.prefix)
                need_snapshot = True
                self._backoff(None)

    def _backoff(self, exc: Exception | None) -> None:
        """Exponential with jitter, so that the watches of many agents that failed together retry apart."""
        delay = min(self.retry_delay * 2**self._failures, self.max_retry_delay) * random.uniform(0.5, 1.0)
        self._failures += 1
        if exc is not None:
            self.failing = str(exc)
            level = logging.WARNING if self.log_retries else logging.DEBUG
            log.log(level, "watch %s: %s; retrying in %.2fs", self.prefix, exc, delay)
        self._stop.wait(delay)

    # --- snapshot ----------------------------------------------------------------------------------------

    def _resync(self) -> None:
        kvs, revision = self.client.get_prefix(self.prefix)
        self.failing = None
        self.snapshots += 1
        self.last_progress = time.monotonic()
        present = {kv.key for kv in kvs}
        for kv in kvs:
            seen = self._seen.get(kv.key)
            if seen is None or seen.mod_revision != kv.mod_revision:
                self._apply_put(kv)
        for path in [p for p in self._seen if p not in present]:
            self._apply_delete(path, revision)
        self.revision = revision
        self._emit(InSync(revision), None)

    # --- watch -------------------------------------------------------------------------------------------

    def _watch_from(self, start_revision: int, resumed: bool) -> None:
        self._stream = stream = self.client.watch_prefix(self.prefix, start_revision)
        try:
            if self._stop.is_set():
                return
            for batch in stream:
                self.last_progress = time.monotonic()
                if batch.created:
                    if batch.revision < self.revision:
                        raise _Rewound(f"{stream.endpoint} is at revision {batch.revision}, we were at {self.revision}")
                    if resumed:
                        self.reconnects += 1
                    self._failures = 0
                    self.failing = None
                    continue
                for event in batch.events:
                    if event.type == "put":
                        self._apply_put(event.kv)
                    else:
                        self._apply_delete(event.kv.key, event.kv.mod_revision)
                    # Events of one revision arrive in one batch, so resuming after this one loses nothing.
                    self.revision = max(self.revision, event.kv.mod_revision)
        finally:
            stream.cancel()
            self._stream = None

    # --- applying one change -----------------------------------------------------------------------------

    def _apply_put(self, kv: KV) -> None:
        try:
            key, value = self._decode(kv)
        except (ModelError, InvalidKey) as exc:
            self._mark_malformed(kv, str(exc))
            return
        self.malformed.pop(kv.key, None)
        self._seen[kv.key] = _Seen(kv.mod_revision, True, key)
        failure = self._emit(Updated(key, kv.key, value, kv.mod_revision), kv.key)
        if failure is not None:
            # The consumer could not take it: for it, the key is as good as unreadable.
            self._mark_malformed(kv, f"the consumer failed on it: {failure!r}")

    def _decode(self, kv: KV) -> tuple[Key, codec.Model]:
        if not _is_utf8(kv.key):
            raise InvalidKey(f"key is not UTF-8: {printable_key(kv.key)}")
        try:
            return codec.decode(kv.key, kv.value)
        except (ModelError, InvalidKey):
            raise
        except Exception as exc:  # a codec bug must not end the watch
            self.errors += 1
            log.exception("decoding %s", printable_key(kv.key))
            raise ModelError(f"cannot decode: {exc!r}") from None

    def _mark_malformed(self, kv: KV, reason: str) -> None:
        if self.malformed.get(kv.key) != reason:
            log.warning("skipping malformed value at %s: %s", printable_key(kv.key), reason)
        self.malformed[kv.key] = reason
        bad_key: Key | None
        try:
            bad_key = keys.parse_key(kv.key) if _is_utf8(kv.key) else None
        except InvalidKey:
            bad_key = None
        self._seen[kv.key] = _Seen(kv.mod_revision, False, bad_key)
        self._emit(Malformed(bad_key, kv.key, reason, kv.mod_revision), kv.key)

    def _apply_delete(self, path: str, mod_revision: int) -> None:
        old = self._seen.pop(path, None)
        self.malformed.pop(path, None)
        if old is not None:
            self._emit(Deleted(old.key, path, mod_revision), path)

    def _emit(self, update: Update, path: str | None) -> Exception | None:
        """Hand one update to the consumer. Its exception is logged with the key and returned, never raised: one
        key the consumer cannot handle must not stop every later update of the prefix."""
        try:
            self.sink(update)
        except Exception as exc:
            self.errors += 1
            where = printable_key(path) if path is not None else self.prefix
            log.exception("watch %s: the consumer failed on %s (%s)", self.prefix, where, type(update).__name__)
            return exc
        return None
