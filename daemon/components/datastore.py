"""The datastore component: one etcd client and one cache (every watch) that every other component reads.

Ready once the cache holds a full snapshot; not alive when a watch thread ended or has heard nothing from etcd for
``progress_timeout`` (a stalled watch is resumed by the client long before that). An etcd outage alone keeps the
component alive and ready (the cache keeps its last snapshot and the dataplane stays as it is); the state change
is logged once each way.
"""

from __future__ import annotations

import logging
import time

from agent.cache import Cache
from daemon.component import Health
from datastore.etcd import EtcdClient

log = logging.getLogger(__name__)


class DatastoreComponent:
    name = "datastore"

    def __init__(self, client: EtcdClient, progress_timeout: float = 60.0) -> None:
        self.client = client
        self.cache = Cache(client)
        self.progress_timeout = progress_timeout
        self._started = 0.0

    def start(self) -> None:
        self._started = time.monotonic()
        self.cache.start()

    def wait_in_sync(self, timeout: float) -> bool:
        return self.cache.in_sync.wait(timeout)

    def stop(self, deadline: float) -> None:
        self.cache.stop()

    def health(self) -> Health:
        now = time.monotonic()
        problems = self.cache.problems(self.progress_timeout)
        progress = max((w.last_progress for w in self.cache.watchers), default=now)
        if problems:
            return Health(False, False, "; ".join(problems), progress, self.progress_timeout)
        snap_revision = self.cache.snapshot().revision
        if not self.cache.in_sync.is_set():
            return Health(True, False, "waiting for the first snapshot of the datastore", now, self.progress_timeout)
        return Health(True, True, f"in sync (revision {snap_revision})", now, self.progress_timeout)
