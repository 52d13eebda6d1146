"""The policy reconcile loop: datastore changes mark the dataplane dirty; one thread recomputes and writes.

- Nothing is written before the datastore is in sync (``desired()`` returns None until then).
- Changes arriving while a sync runs only set the dirty flag again, so a burst costs one more sync, not one each.
- The first sync after start is a full one: it reads the kernel back and adopts the podnet chains and sets already
  there (a restart flushes nothing; unchanged chains are not even rewritten). Stale podnet chains, jumps and sets
  are removed only after that first full sync has succeeded.
- Every ``resync_interval`` a full sync repairs drift (a chain deleted or edited by hand, our jump moved down).
- After a failure the next attempt is a full sync, after ``retry_interval``, doubling with each failure in a row up
  to ``max_retry_interval``.
- A chain the kernel refuses (see programmer.py) is charged to the source it was compiled from (``Desired.source_of``:
  a policy, "<namespace>/<name>"). The source goes into ``refused`` and the state is computed again at once: a
  ``desired`` callback that passes ``refused`` to the compiler (``compile_node(refused=…)``) gets that policy's chains
  allowing nothing (its pods stay isolated by it) and the rest of the node's policy written as usual. The refusal
  holds until the source's value (``Desired.version_of``) changes; the new value is then tried once. Each change of
  the refused set is logged once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from agent.calc.state import DataplaneState
from agent.dataplane.programmer import PolicyDataplane, SyncResult
from agent.dataplane.stats import Histogram

log = logging.getLogger(__name__)
HEARTBEAT = 5.0  # seconds: the loop goes round at least this often, even with nothing to do


def _no_source(_chain: str) -> str | None:
    return None


def _no_version(_source: str) -> object:
    return None


@dataclass(frozen=True)
class Desired:
    revision: int  # the datastore revision the state was computed from
    state: DataplaneState
    source_of: Callable[[str], str | None] = _no_source  # chain name -> what it was compiled from (a policy)
    version_of: Callable[[str], object] = _no_version  # source -> its current value (None: gone)


@dataclass(frozen=True)
class Refusal:
    reason: str  # the kernel's
    chains: tuple[str, ...]  # "table/chain"
    version: object  # the source's value when it was refused


@dataclass(frozen=True)
class SyncReport:
    revision: int
    result: SyncResult
    seconds: float
    refused: Mapping[str, str] = field(default_factory=dict)  # source -> the kernel's reason


class Backoff:
    """Seconds to wait before the next attempt after ``failures`` failures in a row: doubling, capped."""

    def __init__(self, first: float, cap: float) -> None:
        self.first = first
        self.cap = cap
        self.failures = 0

    def next(self) -> float:
        self.failures += 1
        return float(min(self.cap, self.first * 2.0 ** (self.failures - 1)))

    def reset(self) -> None:
        self.failures = 0


class PolicySyncer:
    def __init__(
        self,
        dataplane: PolicyDataplane,
        desired: Callable[[], Desired | None],
        *,
        resync_interval: float = 30.0,
        retry_interval: float = 1.0,
        on_synced: Callable[[SyncReport], None] | None = None,
        max_retry_interval: float = 30.0,
    ) -> None:
        self.dataplane = dataplane
        self._desired = desired
        self.resync_interval = resync_interval
        self.retry_interval = retry_interval
        self.backoff = Backoff(retry_interval, max_retry_interval)
        self._on_synced = on_synced
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cleaned = False  # stale objects removed after the first full sync
        self._need_full = True
        self._next_full = 0.0
        self.last_error: Exception | None = None
        self.syncs = 0
        self.failures = 0  # syncs that raised (each is retried)
        # For the metrics (any thread reads them; each is replaced, never mutated, or is thread-safe itself):
        self.durations = {"full": Histogram(), "incremental": Histogram()}  # seconds per successful sync
        self.last_revision: int | None = None  # the datastore revision the last successful sync wrote
        self.last_sync_time: float | None = None  # time.time() of its end
        self.last_progress = time.monotonic()  # the loop's last round (for the owner's liveness check)
        # Sources whose chains the kernel refused. Replaced, never mutated, so any thread may read it.
        self.refusals: dict[str, Refusal] = {}
        self.unowned_refused: dict[str, str] = {}  # refused chains charged to no source ("table/chain" -> reason)

    @property
    def refused(self) -> dict[str, str]:
        """Source ("<namespace>/<name>") -> the kernel's reason: what a ``desired`` callback compiles as refused."""
        return {source: r.reason for source, r in self.refusals.items()}

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
        if desired is not None and self._retry_changed(desired):
            desired = self._desired()  # computed again without the refusals just dropped
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
            result.refused = cleanup.refused
        if self._charge(result.refused, desired):
            again = self._desired()  # the newly refused sources now compile to chains that allow nothing
            if again is not None:
                desired = again
                second = self.dataplane.apply(desired.state, delete_stale=self._cleaned)
                result.chains_written += second.chains_written
                result.chains_deleted += second.chains_deleted
                result.jumps_fixed += second.jumps_fixed
                result.sets_changed += second.sets_changed
                result.sets_destroyed += second.sets_destroyed
                result.refused = second.refused
                self._charge(result.refused, desired)
        if full:
            self._next_full = time.monotonic() + self.resync_interval
        self._need_full = False
        report = SyncReport(desired.revision, result, time.perf_counter() - started, self.refused)
        self.syncs += 1
        # The dataplane may have made it a full one (its memory of the kernel was dropped after a failure).
        self.durations["full" if full or result.full else "incremental"].observe(report.seconds)
        self.last_revision = desired.revision
        self.last_sync_time = time.time()
        if result.wrote:
            log.info(
                "policy sync rev %d (%s): chains written %d, deleted %d, jumps fixed %s, sets changed %d, "
                "destroyed %d in %.1f ms",
                desired.revision,
                "full" if full else "incremental",
                len(result.chains_written),
                len(result.chains_deleted),
                ", ".join(result.jumps_fixed) or "none",
                result.sets_changed,
                result.sets_destroyed,
                report.seconds * 1000,
            )
        if self._on_synced is not None:
            self._on_synced(report)
        return report

    def _retry_changed(self, desired: Desired) -> bool:
        """Forget the refusals whose source changed or is gone (the new value is tried once); True if any."""
        keep = {s: r for s, r in self.refusals.items() if desired.version_of(s) == r.version}
        if len(keep) == len(self.refusals):
            return False
        for source in sorted(set(self.refusals) - set(keep)):
            log.info("policy %s changed: trying it in the kernel again", source)
        self.refusals = keep
        return True

    def _charge(self, refused_chains: Mapping[str, str], desired: Desired) -> bool:
        """Charge refused chains to their sources; True if a source was newly refused (the state must then be
        computed again). Logs each change of the refused set once."""
        by_source: dict[str, list[str]] = {}
        unowned: dict[str, str] = {}
        for chain, reason in refused_chains.items():
            source = desired.source_of(chain.split("/", 1)[1])
            if source is None:
                unowned[chain] = reason
            else:
                by_source.setdefault(source, []).append(chain)
        new = {
            source: Refusal(refused_chains[chains[0]], tuple(chains), desired.version_of(source))
            for source, chains in by_source.items()
            if source not in self.refusals
        }
        for source, refusal in sorted(new.items()):
            log.warning(
                "policy %s refused by the kernel (%s): %s; it allows nothing until it changes",
                source,
                ", ".join(refusal.chains),
                refusal.reason,
            )
        for chain in sorted(set(unowned) - set(self.unowned_refused)):
            log.error("chain %s refused by the kernel: %s; it lets nothing through", chain, unowned[chain])
        for chain in sorted(set(self.unowned_refused) - set(unowned)):
            log.info("chain %s is no longer refused", chain)
        self.unowned_refused = unowned
        if new:
            self.refusals = {**self.refusals, **new}
        return bool(new)

    def run(self) -> None:
        """The loop, on the caller's thread (``start`` runs it on its own); returns after ``stop``."""
        self._run()

    def _run(self) -> None:
        waiting = True  # for the datastore to be in sync: only a change (e.g. the in-sync marker) can end that
        while not self._stop.is_set():
            self.last_progress = time.monotonic()
            if waiting:
                self._dirty.wait(timeout=1.0)
            elif not self._need_full:
                # Wakes at least every HEARTBEAT seconds when idle, so that an owner can tell idle from wedged.
                self._dirty.wait(timeout=min(HEARTBEAT, max(0.0, self._next_full - time.monotonic())))
                if not self._dirty.is_set() and time.monotonic() < self._next_full:
                    continue
            if self._stop.is_set():
                return
            try:
                waiting = self.sync_once() is None
                self.last_error = None
                self.backoff.reset()
            except Exception as exc:
                self.last_error = exc
                self.failures += 1
                self._need_full = True
                waiting = False  # retry after the delay, not only on the next change
                delay = self.backoff.next()
                log.error("policy sync failed (full resync in %.1fs): %s", delay, exc)
                self._stop.wait(delay)
