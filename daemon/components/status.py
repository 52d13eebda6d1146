"""The status component: owns the agent's lease-bound status keys (``agents/<node>``; the router adds its routes
and BGP peers through the same reporter) and, about once a second, composes the agent's record from every
component: in sync, the datastore revision policy and routes reflect, readiness with the reason of each component
that is not ready, run modes, rejected policies. A record is handed to the reporter only when it changed; the
reporter writes from its own thread (a slow etcd never delays anything) and the lease's expiry removes them all
when the agent is gone."""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
import time
from collections.abc import Callable

from agent.cache import Cache
from agent.status import StatusPublisher, StatusReporter
from daemon.component import Health, Heartbeat
from daemon.components.policy import PolicyComponent
from daemon.components.router import RouterComponent
from daemon.supervisor import Status
from daemon.threads import Threads
from datastore import model as m
from datastore.etcd import EtcdClient

PERIOD = 1.0
# A record that differs from the last one only in revisions (every change anywhere in the cluster moves them) is
# written at most this often: the first after a quiet spell goes out within PERIOD (a tool waiting for its change
# sees it at once), a burst costs one write per node per REVISION_EVERY, not one per change.
REVISION_EVERY = 5.0


def _without_revisions(status: m.AgentStatus) -> m.AgentStatus:
    return dataclasses.replace(status, revision=0, policy_revision=None, routes_revision=None)


LOOP_TIMEOUT = 30.0


class StatusComponent:
    name = "status"

    def __init__(
        self,
        client: EtcdClient,
        cache: Cache,
        node: str,
        threads: Threads,
        *,
        ttl: int,
        modes: tuple[str, ...],
        version: str,
        supervisor_status: Callable[[], Status] | None = None,
    ) -> None:
        self.cache = cache
        self.node = node
        self.threads = threads
        self.modes = modes
        self.version = version
        self.publisher = StatusPublisher(client, node, ttl=ttl)
        self.reporter = StatusReporter(self.publisher)
        self.supervisor_status = supervisor_status
        self.policy: PolicyComponent | None = None
        self.router: RouterComponent | None = None
        self.revoke_on_stop = True
        self._stop = threading.Event()
        self._heartbeat = Heartbeat(LOOP_TIMEOUT, reason="starting")
        self._thread: threading.Thread | None = None
        self._last: m.AgentStatus | None = None
        self._published_at = -REVISION_EVERY  # time.monotonic() of the last record handed to the reporter
        self._since = ""
        self._was_in_sync: bool | None = None
        self.problems: Callable[[], list[str]] = list  # extra problems (bootstrap's), set by the owner

    def start(self) -> None:
        self.reporter.start()
        self._thread = self.threads.spawn(self.name, "status", self._loop)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.publish_once()
            self._heartbeat.beat(ready=True, reason="publishing")
            self._stop.wait(PERIOD)

    def compose(self) -> m.AgentStatus:
        snap = self.cache.snapshot()
        if snap.in_sync != self._was_in_sync:
            self._was_in_sync = snap.in_sync
            self._since = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        base = m.AgentStatus(self.node, snap.in_sync, snap.revision, since=self._since)
        routes_revision = None
        if self.router is not None:
            view = self.router.runner.agent_view
            if view is not None:
                base = dataclasses.replace(view, in_sync=snap.in_sync, revision=snap.revision, since=self._since)
            routes_revision = self.router.runner.applied_revision
        policy_revision = None
        rejected: tuple[str, ...] = ()
        if self.policy is not None:
            policy_revision = self.policy.applied_revision
            feed = self.policy.feed
            if feed is not None:
                rejected = tuple(f"{key}: {why}" for key, why in sorted(feed.rejected.items()))
        ready = False
        not_ready: tuple[str, ...] = ("agent: starting",)
        if self.supervisor_status is not None:
            st = self.supervisor_status()
            others = [c for c in st.components if c.name != self.name]
            not_ready = tuple(f"{c.name}: {c.reason}" for c in others if not (c.live and c.ready))
            ready = not not_ready
        return dataclasses.replace(
            base,
            problems=(*base.problems, *self.problems()),
            ready=ready,
            not_ready=not_ready,
            modes=self.modes,
            policy_revision=policy_revision,
            routes_revision=routes_revision,
            rejected_policies=rejected,
            version=self.version,
        )

    def publish_once(self, now: float | None = None) -> bool:
        """Hand the record to the reporter if it changed (revisions alone: see ``REVISION_EVERY``); True if it did."""
        now = time.monotonic() if now is None else now
        status = self.compose()
        last = self._last
        if status == last:
            return False
        only_revisions = last is not None and _without_revisions(status) == _without_revisions(last)
        if only_revisions and now - self._published_at < REVISION_EVERY:
            return False
        self.reporter.offer_agent(status)
        self._last = status
        self._published_at = now
        return True

    def stop(self, deadline: float) -> None:
        self.threads.stopping(self.name)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(max(0.0, min(2.0, deadline - time.monotonic())))
        self.reporter.stop(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
        # The lease goes with us: `agentctl status` then says the agent is not running (the kernel keeps its state).
        self.publisher.close(revoke=self.revoke_on_stop)

    def health(self) -> Health:
        return self._heartbeat.snapshot()
