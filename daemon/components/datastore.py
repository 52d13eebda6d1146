"""The datastore component: one etcd client and one cache (every watch) that every other component reads.

Ready once the cache holds a full snapshot; not alive when a watch thread ended or has heard nothing from etcd for
``progress_timeout`` (a stalled watch is resumed by the client long before that). An etcd outage alone keeps the
component alive and ready (the cache keeps its last snapshot and the dataplane stays as it is). The outage is
logged once when it starts and once when it ends, for all the watches together (each watch's retries are at debug
level).
"""

from __future__ import annotations

import logging
import threading
import time

from agent.cache import Cache
from daemon.component import Health
from daemon.threads import Threads
from datastore.etcd import EtcdClient

log = logging.getLogger(__name__)
MONITOR_PERIOD = 1.0


class DatastoreComponent:
    name = "datastore"

    def __init__(self, client: EtcdClient, threads: Threads, progress_timeout: float = 60.0) -> None:
        self.client = client
        self.threads = threads
        self.cache = Cache(client, log_retries=False)
        self.progress_timeout = progress_timeout
        self.outage_since: float | None = None  # time.monotonic() the current outage began
        self.outages = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._monitor_progress = time.monotonic()

    def start(self) -> None:
        self.cache.start()
        self._thread = self.threads.spawn(self.name, "datastore-monitor", self._monitor)

    def _monitor(self) -> None:
        while not self._stop.wait(MONITOR_PERIOD):
            self._monitor_progress = time.monotonic()
            self.check_outage()

    def check_outage(self) -> None:
        failing = [w for w in self.cache.watchers if w.failing]
        now = time.monotonic()
        if failing and self.outage_since is None:
            self.outage_since = now
            self.outages += 1
            log.warning(
                "datastore unreachable (%d of %d watches failing: %s); the dataplane keeps its state, retrying",
                len(failing), len(self.cache.watchers), failing[0].failing,
            )  # fmt: skip
        elif not failing and self.outage_since is not None:
            log.warning("datastore reachable again after %.0f s; catching up", now - self.outage_since)
            self.outage_since = None

    def wait_in_sync(self, timeout: float) -> bool:
        return self.cache.in_sync.wait(timeout)

    def stop(self, deadline: float) -> None:
        self.threads.stopping(self.name)
        self._stop.set()
        self.cache.stop()
        if self._thread is not None:
            self._thread.join(max(0.0, min(2.0, deadline - time.monotonic())))

    def health(self) -> Health:
        now = time.monotonic()
        problems = self.cache.problems(self.progress_timeout)
        progress = self._monitor_progress
        if problems:
            return Health(False, False, "; ".join(problems), progress, self.progress_timeout)
        if not self.cache.in_sync.is_set():
            return Health(True, False, "waiting for the first snapshot of the datastore", progress,
                          self.progress_timeout)  # fmt: skip
        revision = self.cache.snapshot().revision
        if self.outage_since is not None:
            # Ready still: the dataplane is as good as the last snapshot; say why nothing changes.
            return Health(True, True, f"etcd unreachable for {now - self.outage_since:.0f} s; keeping revision "
                          f"{revision}", progress, self.progress_timeout)  # fmt: skip
        return Health(True, True, f"in sync (revision {revision})", progress, self.progress_timeout)
