"""The policy reconcile loop: datastore changes mark the dataplane dirty; one thread recomputes and writes.

- Nothing is written before the datastore is in sync (``desired()`` returns None until then).
- Changes arriving while a sync runs only set the dirty flag again, so a burst costs one more sync, not one each.
- The first sync after start is a full one: it reads the kernel back and adopts the podnet chains and sets already
  there (a restart flushes nothing; unchanged chains are not even rewritten). Stale podnet chains, jumps and sets
  are removed only after that first full sync has succeeded.
- Every ``resync_interval`` a full sync repairs drift (a chain deleted or edited by hand, our jump moved down).
- After a failure the next attempt is a full sync, after ``retry_interval``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.calc.state import DataplaneState
from agent.dataplane.programmer import PolicyDataplane, SyncResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Desired:
    revision: int  # the datastore revision the state was computed from
    state: DataplaneState


@dataclass(frozen=True)
class SyncReport:
    revision: int
    result: SyncResult
    seconds: float


class PolicySyncer:
    def __init__(
        self,
        dataplane: PolicyDataplane,
        desired: Callable[[], Desired | None],
        resync_interval: float = 30.0,
        retry_interval: float = 1.0,
        on_synced: Callable[[SyncReport], None] | None = None,
    ) -> None:
        self.dataplane = dataplane
        self._desired = desired
        self.resync_interval = resync_interval
        self.retry_interval = retry_interval
        self._on_synced = on_synced
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cleaned = False  # stale objects removed after the first full sync
        self._need_full = True
        self._next_full = 0.0
        self.last_error: Exception | None = None
        self.syncs = 0

    def mark_dirty(self) -> None:
        """Called by the cache on every change (cheap, any thread)."""
        self._dirty.set()

    def start(self) -> PolicySyncer:
        self._thread = threading.Thread(target=self._run, name="policy-syncer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._dirty.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def sync_once(self) -> SyncReport | None:
        """One reconcile step; None when the datastore is not in sync yet (nothing is written then)."""
        self._dirty.clear()
        desired = self._desired()
        if desired is None:
            return None
        full = self._need_full or time.monotonic() >= self._next_full
        started = time.perf_counter()
        result = self.dataplane.apply(desired.state, full=full, delete_stale=self._cleaned)
        if not self._cleaned:
            # The first full sync is in: now what is not desired is stale and may go.
            self._cleaned = True
        if result.stale_found:
            cleanup = self.dataplane.apply(desired.state, delete_stale=True)
            result.chains_deleted += cleanup.chains_deleted
            result.jumps_fixed += cleanup.jumps_fixed
            result.sets_destroyed += cleanup.sets_destroyed
        if full:
            self._next_full = time.monotonic() + self.resync_interval
        self._need_full = False
        report = SyncReport(desired.revision, result, time.perf_counter() - started)
        self.syncs += 1
        if result.wrote:
            log.info(
                "policy sync rev %d (%s): chains written %d, deleted %d, jumps fixed %s, sets changed %d, "
                "destroyed %d in %.1f ms",
                desired.revision,
                "full" if full else "incremental",
                len(result.chains_written),
                len(result.chains_deleted),
                result.jumps_fixed,
                result.sets_changed,
                result.sets_destroyed,
                report.seconds * 1000,
            )
        if self._on_synced is not None:
            self._on_synced(report)
        return report

    def _run(self) -> None:
        waiting = True  # for the datastore to be in sync: only a change (e.g. the in-sync marker) can end that
        while not self._stop.is_set():
            if waiting:
                self._dirty.wait(timeout=1.0)
            elif not self._need_full:
                self._dirty.wait(timeout=max(0.0, self._next_full - time.monotonic()))
            if self._stop.is_set():
                return
            try:
                waiting = self.sync_once() is None
                self.last_error = None
            except Exception as exc:
                self.last_error = exc
                self._need_full = True
                log.error("policy sync failed (full resync in %.1fs): %s", self.retry_interval, exc)
                self._stop.wait(self.retry_interval)
