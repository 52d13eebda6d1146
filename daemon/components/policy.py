"""The policy component: the cache → ``PolicyFeed`` (compiler + natOutgoing) → ``PolicySyncer`` → iptables and
ipsets. Ready after the first sync reached the kernel; not alive when its loop has not gone round within its
timeout (it wakes every few seconds even when idle). Stopping leaves every chain and set in place."""

from __future__ import annotations

import threading
import time

from agent.cache import Cache
from agent.dataplane.backend import detect
from agent.dataplane.cmd import CommandRunner
from agent.dataplane.policy_syncer import PolicySyncer, SyncReport
from agent.dataplane.programmer import PolicyDataplane
from agent.policy_feed import PolicyFeed
from daemon.component import Health
from daemon.threads import Threads

LOOP_TIMEOUT = 120.0  # a full sync of a big node may take tens of seconds


class PolicyComponent:
    name = "policy"

    def __init__(
        self,
        cache: Cache,
        node: str,
        threads: Threads,
        *,
        netns: str | None = None,
        backend: str = "auto",
        sync_period: float = 300.0,
    ) -> None:
        self.cache = cache
        self.node = node
        self.threads = threads
        self.netns = netns
        self.backend = backend
        self.sync_period = sync_period
        self.syncer: PolicySyncer | None = None
        self.feed: PolicyFeed | None = None
        self.runner: CommandRunner | None = None  # its ``stats`` count iptables/ipset calls for the metrics
        self.last_report: SyncReport | None = None
        self.applied_revision: int | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        runner = self.runner = CommandRunner(self.netns)
        dataplane = PolicyDataplane(runner, detect(runner, None if self.backend == "auto" else self.backend))
        syncers: list[PolicySyncer] = []
        self.feed = PolicyFeed(self.cache, self.node, refused=lambda: syncers[0].refused if syncers else {})
        syncer = PolicySyncer(dataplane, self.feed.desired, resync_interval=self.sync_period, on_synced=self._synced)
        syncers.append(syncer)
        self.syncer = syncer
        self.cache.subscribe(syncer.mark_dirty)
        syncer.mark_dirty()
        self._thread = self.threads.spawn(self.name, "policy-sync", syncer.run)

    def _synced(self, report: SyncReport) -> None:
        self.last_report = report
        self.applied_revision = report.revision

    def stop(self, deadline: float) -> None:
        syncer, thread = self.syncer, self._thread
        if syncer is None:
            return
        self.threads.stopping(self.name)
        syncer.stop()  # the loop runs on our thread: this only asks it to end
        if thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()))

    def health(self) -> Health:
        syncer = self.syncer
        now = time.monotonic()
        if syncer is None:
            return Health(True, False, "not started", now, LOOP_TIMEOUT)
        if self.applied_revision is None:
            if syncer.last_error is not None:
                reason = f"first sync failed: {syncer.last_error}"
            elif not self.cache.in_sync.is_set():
                reason = "waiting for the datastore"
            else:
                reason = "first sync in progress"
            return Health(True, False, reason, syncer.last_progress, LOOP_TIMEOUT)
        if syncer.last_error is not None:
            return Health(True, True, f"last sync failed, retrying: {syncer.last_error}", syncer.last_progress,
                          LOOP_TIMEOUT)  # fmt: skip
        return Health(True, True, f"in sync (revision {self.applied_revision})", syncer.last_progress, LOOP_TIMEOUT)
