"""Snapshot-then-watch over a key prefix, giving consumers a consistent stream of typed updates.

The watcher reads the whole prefix at revision N, emits every object, emits ``InSync(N)``, then watches from N+1.
When the watch breaks (compaction, a disconnect, an etcd restart), it takes a new snapshot and emits only the
differences from what the consumer already has, followed by a new ``InSync``: no missed update, no phantom delete.

Values are decoded with ``datastore.codec``. A malformed value (or key) is logged with its key and reported as
``Malformed``: whatever valid object the key held is gone, and a consumer for whom "missing" would open something (a
policy) can fail closed instead. Deleting a malformed key gives a ``Deleted`` (with ``key`` None when the key itself
does not parse).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from datastore import codec, keys
from datastore.errors import Compacted, DatastoreError
from datastore.etcd import KV, EtcdClient, WatchStream
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


class Watcher:
    """Watch one prefix and feed ``sink``. Run ``run()`` in a thread of your own, or use ``start()``."""

    def __init__(
        self,
        client: EtcdClient,
        prefix: str,
        sink: Sink,
        retry_delay: float = 0.2,
        max_retry_delay: float = 5.0,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.sink = sink
        self.retry_delay = retry_delay
        self.max_retry_delay = max_retry_delay
        self.snapshots = 0  # how many snapshots were taken (1 + one per resync)
        self.compactions = 0  # how many times the watch found its start revision compacted
        self.malformed: dict[str, str] = {}  # path -> reason, for keys currently skipped
        self._seen: dict[str, _Seen] = {}
        self._stop = threading.Event()
        self._stream: WatchStream | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Watcher:
        self._thread = threading.Thread(target=self.run, name=f"watch:{self.prefix}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        stream = self._stream
        if stream is not None:
            stream.cancel()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def run(self) -> None:
        delay = self.retry_delay
        while not self._stop.is_set():
            try:
                revision = self._resync()
                delay = self.retry_delay
                self._watch_from(revision + 1)
            except Compacted as exc:
                self.compactions += 1
                log.info("watch %s: history compacted (%s); taking a new snapshot", self.prefix, exc)
            except DatastoreError as exc:
                if self._stop.is_set():
                    return
                log.warning("watch %s: %s; retrying in %.1fs", self.prefix, exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, self.max_retry_delay)

    # --- snapshot ----------------------------------------------------------------------------------------

    def _resync(self) -> int:
        kvs, revision = self.client.get_prefix(self.prefix)
        self.snapshots += 1
        present = {kv.key for kv in kvs}
        for kv in kvs:
            seen = self._seen.get(kv.key)
            if seen is None or seen.mod_revision != kv.mod_revision:
                self._apply_put(kv)
        for path in [p for p in self._seen if p not in present]:
            self._apply_delete(path, revision)
        self.sink(InSync(revision))
        return revision

    # --- watch -------------------------------------------------------------------------------------------

    def _watch_from(self, start_revision: int) -> None:
        self._stream = self.client.watch_prefix(self.prefix, start_revision)
        try:
            if self._stop.is_set():
                return
            for batch in self._stream:
                for event in batch.events:
                    if event.type == "put":
                        self._apply_put(event.kv)
                    else:
                        self._apply_delete(event.kv.key, event.kv.mod_revision)
        finally:
            self._stream.cancel()
            self._stream = None

    # --- applying one change -----------------------------------------------------------------------------

    def _apply_put(self, kv: KV) -> None:
        try:
            key, value = codec.decode(kv.key, kv.value)
        except (ModelError, InvalidKey) as exc:
            if self.malformed.get(kv.key) != str(exc):
                log.warning("skipping malformed value at %s: %s", kv.key, exc)
            self.malformed[kv.key] = str(exc)
            bad_key: Key | None
            try:
                bad_key = keys.parse_key(kv.key)
            except InvalidKey:
                bad_key = None
            self._seen[kv.key] = _Seen(kv.mod_revision, False, bad_key)
            self.sink(Malformed(bad_key, kv.key, str(exc), kv.mod_revision))
            return
        self.malformed.pop(kv.key, None)
        self._seen[kv.key] = _Seen(kv.mod_revision, True, key)
        self.sink(Updated(key, kv.key, value, kv.mod_revision))

    def _apply_delete(self, path: str, mod_revision: int) -> None:
        old = self._seen.pop(path, None)
        self.malformed.pop(path, None)
        if old is not None:
            self.sink(Deleted(old.key, path, mod_revision))
