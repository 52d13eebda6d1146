"""The router's loop: the cache, the BGP speaker, route calculation, the route and device writers and the status
diff, one pass at a time.

One pass (on any datastore or BGP change, and about every ``resync`` seconds, jittered by ±10 %, to repair what
someone else broke):

1. nothing touches the kernel until the cache is in sync with etcd;
2. the speaker gets the peer set and our prefixes (``bgp.plan``), and is (re)created when our identity changes;
3. ``agent.calc.routes`` plans routes and devices from the snapshot and the speaker's best routes;
4. the link writer, then the route writer, make the kernel match (learned routes are removed only as
   ``bgp_latch`` allows);
5. status (programmed routes, peers, the agent itself) is handed to the status reporter (``status_diff``), which
   writes it to etcd under its lease from its own thread: a slow or absent etcd never delays a pass.

The cluster config's ``logLevel`` sets podnet's loggers (unless ``--log-level`` was given: the command line wins).
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
import time
from collections.abc import Callable

from agent.cache import Cache
from agent.calc.routes import RoutePlan, plan_routes
from agent.calc.snapshot import Snapshot
from agent.dataplane.links import LinkWriter
from agent.dataplane.netlink import Netlink
from agent.dataplane.routes import RouteResult, RouteWriter
from agent.logs import apply_log_level
from agent.router.bgp_latch import BgpLatch
from agent.router.config import RouterConfig
from agent.router.status_diff import StatusDiff
from agent.status import StatusPublisher, StatusReporter
from bgp.plan import (
    SpeakerIdentity,
    identity,
    malformed_peer_errors,
    peer_config_errors,
    plan_announcements,
    plan_peers,
)
from bgp.rib import LearnedRoute
from bgp.speaker import Speaker, SpeakerConfig
from datastore import model as m
from datastore.etcd import EtcdClient

log = logging.getLogger(__name__)
ANNOUNCE_HANDOFF = 0.05  # seconds a pass waits at most for the speaker to start sending a changed announcement
# Per-hop timestamps for latency analysis (--trace FILE; bench/routes_convergence.py --trace).
trace = logging.getLogger("podnet.trace.runner")


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


# Snapshot fields route planning and BGP announcements never read (agent/calc/routes.py, bgp/plan.py).
UNRELATED = frozenset({"policies", "pods", "namespaces", "broken_policies"})


def _endpoint_node(key: object) -> object:
    return key[0] if isinstance(key, tuple) and key else None


class Router:
    def __init__(
        self,
        client: EtcdClient,
        config: RouterConfig,
        *,
        cache: Cache | None = None,
        reporter: StatusReporter | None = None,
        publish_agent: bool = True,
    ) -> None:
        """``cache`` and ``reporter``: shared with the rest of ``podnet-agent`` (then started and stopped by it);
        by default the router makes its own. ``publish_agent=False``: the owner composes the agent's status key
        from ``agent_view`` and the other components' state."""
        self.client = client
        self.config = config
        self.node = config.node
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._owns_cache = cache is None
        if cache is None:
            self.cache = Cache(client, on_change=self._datastore_changed)
        else:
            self.cache = cache
            cache.subscribe(self._datastore_changed)
        self.netlink = Netlink(config.netns)
        self.links = LinkWriter(self.netlink)
        self.routes = RouteWriter(self.netlink)
        self._owns_reporter = reporter is None
        self.status: StatusPublisher | None = None
        if reporter is None:
            self.status = StatusPublisher(client, config.node, ttl=config.status_ttl)
            reporter = StatusReporter(self.status)
        self.reporter = reporter
        self.status_diff = StatusDiff(config.node, reporter, publish_agent)
        self.bgp_latch = BgpLatch(config.node, config.settle, config.startup_grace, time.monotonic())
        # For the owner's health and status (read from other threads: each is replaced, never mutated).
        self.last_progress = time.monotonic()  # the loop's last round
        self.applied_revision: int | None = None  # the datastore revision the kernel's routes were computed from
        self.speaker: Speaker | None = None
        self._identity: SpeakerIdentity | None = None
        self._peer_inputs: tuple[object, ...] = ()  # what the speaker's peer set was last planned from
        self._thread: threading.Thread | None = None
        self._last_learned: dict[str, LearnedRoute] = {}
        self._next_verify = 0.0  # when the next verifying pass is due
        self._verify_due = True
        self._withdrawn_done: set[str] = set()
        self._log_level: str | None = None  # the cluster's level last applied
        self._in_sync_since = ""
        self._was_in_sync = False
        # What the last pass did, for tests and the daemon's health endpoint and metrics.
        self.last_plan: RoutePlan | None = None
        self.last_result: RouteResult | None = None
        self.passes = 0
        self.skipped = 0  # passes for changes routes do not depend on (answered without planning)
        self._last_snap: Snapshot | None = None
        self._bgp_event = False  # BGP spoke since the last pass (peer state, routes)

    @property
    def agent_view(self) -> m.AgentStatus | None:
        """What the router would publish as the agent's status."""
        return self.status_diff.agent_view

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def start(self, spawn: Callable[[str, Callable[[], None]], threading.Thread] | None = None) -> Router:
        """``spawn(name, target)`` starts the loop's thread (the daemon's supervised threads); default: a plain
        daemon thread."""
        self.bgp_latch.start(time.monotonic())
        if self._owns_reporter:
            self.reporter.start()
        if self._owns_cache:
            self.cache.start()
        if spawn is None:
            self._thread = threading.Thread(target=self._loop, name=f"runner-{self.node}", daemon=True)
            self._thread.start()
        else:
            self._thread = spawn(f"routes-{self.node}", self._loop)
        return self

    def stop(self, withdraw: bool = True) -> None:
        """``withdraw=False`` is a planned restart: BGP peers keep our routes (graceful restart) and the kernel
        keeps everything; ``withdraw=True`` tells peers we are gone. Status keys go with the lease either way."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.speaker is not None:
            self.speaker.stop(withdraw=withdraw)
        if self._owns_cache:
            self.cache.stop()
        if self._owns_reporter:
            self.reporter.stop()
        if self.status is not None:
            self.status.close(revoke=True)
        self.netlink.close()

    def bgp_readiness(self) -> tuple[bool, str]:
        """Ready the way calico-node's ``-bird-ready`` means it (``BgpLatch.readiness``)."""
        speaker = self.speaker
        if speaker is None:
            return False, "bgp: speaker not started (waiting for the datastore and this node's record)"
        return self.bgp_latch.readiness(speaker.peer_status(), time.monotonic())

    @property
    def bgp_in_sync(self) -> bool:
        """BGP has caught up since start: a learned route missing now is a real withdrawal."""
        return self.bgp_latch.in_sync

    def wake(self) -> None:
        self._wake.set()

    def _datastore_changed(self) -> None:
        if trace.isEnabledFor(logging.DEBUG):
            trace.debug("datastore-change")
        self._wake.set()

    def _bgp_changed(self) -> None:
        if trace.isEnabledFor(logging.DEBUG):
            trace.debug("bgp-change")
        self._bgp_event = True
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.last_progress = time.monotonic()
            recheck_at = self.bgp_latch.recheck_at
            deadline = self._next_verify if recheck_at is None else min(self._next_verify, recheck_at)
            timeout = max(0.0, min(deadline - time.monotonic(), self.config.bgp_poll))
            woken = self._wake.wait(timeout=timeout)
            if self._stop.is_set():
                return
            # Belt and braces: a lost change notification from the speaker costs at most ``bgp_poll`` seconds.
            event = woken or self._learned_changed()
            if not (event or time.monotonic() >= deadline):
                continue
            self._settle()
            try:
                # A change is applied first; a verification that fell due meanwhile gets the next pass (at once),
                # unless changes keep coming for a whole resync period.
                self.sync_once(timed=not event or time.monotonic() >= deadline + self.config.resync)
                if trace.isEnabledFor(logging.DEBUG):
                    trace.debug("pass-end")
            except Exception:
                log.exception("router pass failed; retrying")
                self._stop.wait(1.0)
                self._wake.set()

    def _settle(self) -> None:
        """Let a burst of changes (one etcd transaction seen by several watches, a run of BGP updates) end before
        the pass: wait until none has come for ``coalesce_quiet``, at most ``coalesce_max`` after the first. A
        lone change waits only ``coalesce_quiet``; whatever arrives during the pass wakes the next one."""
        end = time.monotonic() + self.config.coalesce_max
        while True:
            self._wake.clear()
            left = end - time.monotonic()
            if left <= 0 or not self._wake.wait(min(self.config.coalesce_quiet, left)):
                break
        self._wake.clear()

    def _learned_changed(self) -> bool:
        return self.speaker is not None and self.speaker.best_routes() != self._last_learned

    # -- one pass -----------------------------------------------------------------------------------------------

    def sync_once(self, timed: bool = True) -> None:
        """One pass. ``timed``: this pass may be the periodic verifying one if that is due (a pass applying a
        change is not made to wait for a full re-read of the kernel; the loop runs the verification right after)."""
        tracing = trace.isEnabledFor(logging.DEBUG)
        if tracing:
            trace.debug("pass-start")
        due = timed and time.monotonic() >= self._next_verify
        if due:
            # Jittered, so that nodes whose passes run in step (every node wakes on the same datastore change) do
            # not all re-read their kernels and refresh their status in the same instant.
            self._next_verify = time.monotonic() + self.config.resync * random.uniform(0.9, 1.1)
        snap = self.cache.snapshot()
        self.passes += 1
        if snap.in_sync != self._was_in_sync:
            self._was_in_sync = snap.in_sync
            self._in_sync_since = _now()
        if not snap.in_sync:
            self.status_diff.not_ready(m.AgentStatus(self.node, False, snap.revision, since=self._in_sync_since))
            return
        self._follow_log_level(snap.config)
        me = snap.nodes.get(self.node)
        if me is None:
            # Without our record we know neither our address nor our subnet. Leave the kernel as it is (a record
            # deleted by mistake must not cut the node off) and say why.
            why = f"no node record for {self.node}: BGP not started, kernel left as it is"
            agent = m.AgentStatus(self.node, True, snap.revision, since=self._in_sync_since, problems=(why,))
            self.status_diff.not_ready(agent)
            return
        if self._unrelated(snap, verifying=due or self._verify_due):
            # A policy, a pod's labels, another node's endpoint: nothing routes depend on. Planning would cost a
            # pass over every node and block, in the process (and under the interpreter lock) that also compiles
            # the policy this change is about.
            self.skipped += 1
            self.applied_revision = snap.revision
            return
        problems = bgp_config_problems(snap, self.cache.malformed())
        self._steer_speaker(snap, me)
        self._last_learned = self.speaker.best_routes() if self.speaker is not None else {}
        learned = list(self._last_learned.values())
        latch = self.bgp_latch
        peers = None if latch.in_sync or self.speaker is None else self.speaker.peer_status()
        learned_in_sync = latch.in_sync or latch.check(peers, time.monotonic())
        withdrawn = self.bgp_latch.withdrawn(learned)
        plan = plan_routes(snap, self.node, learned)
        log.debug(
            "pass %d: %d routes planned, %d learned, %d withdrawn, BGP in sync: %s",
            self.passes,
            len(plan.routes),
            len(learned),
            len(withdrawn),
            learned_in_sync,
        )
        problems.extend(plan.problems)
        # Passes driven by changes trust the writers' model of the kernel; about every ``resync`` seconds (and
        # after a device was remade, or something failed) a pass re-reads it and repairs what someone else changed.
        verify = self._verify_due or due
        if not verify and plan == self.last_plan and not withdrawn - self._withdrawn_done:
            # Nothing for the kernel (a pass for a change that does not touch routes: a pod's labels, a policy).
            self._publish(self.last_result, problems, snap.revision, refresh=False)
            self.applied_revision = snap.revision
            return
        self._withdrawn_done = set(withdrawn)
        if tracing:
            trace.debug("planned")
        links = self.links.apply(plan, in_sync=True, learned_in_sync=learned_in_sync, verify=verify)
        if tracing:
            trace.debug("links-applied")
        problems.extend(links.problems)
        verify = verify or links.devices_changed
        result = self.routes.apply(
            plan.routes, in_sync=True, learned_in_sync=learned_in_sync, withdrawn=withdrawn, verify=verify
        )
        self._verify_due = bool(result.failed or links.problems)
        problems.extend(f"{cidr}: {why}" for cidr, why in sorted(result.failed.items()))
        if tracing:
            before = self.last_result.programmed if self.last_result is not None else {}
            written = [cidr for cidr, done in result.programmed.items() if before.get(cidr) != done]
            trace.debug("routes-written %s removed=%s", " ".join(written[:5]), " ".join(result.removed[:5]))
        if result.changed:
            log.info(
                "routes: %d written, removed %s (%d learned, BGP in sync: %s)",
                result.changed - len(result.removed),
                result.removed,
                len(learned),
                learned_in_sync,
            )
        self.last_plan, self.last_result = plan, result
        self._publish(result, problems, snap.revision, refresh=verify)
        self.applied_revision = snap.revision

    def _unrelated(self, snap: Snapshot, verifying: bool) -> bool:
        """Whether everything that changed since the last pass is of no concern to routes (and BGP said nothing)."""
        last, self._last_snap = self._last_snap, snap
        bgp_event, self._bgp_event = self._bgp_event, False
        if verifying or bgp_event or last is None or self.last_plan is None or self.speaker is None:
            return False
        if not self.bgp_latch.in_sync or snap.config is not last.config:
            return False
        changes = snap.changes_since(last)
        if not changes:  # None: cannot tell; empty: this pass is for something else (a poll, a retry)
            return False
        for name, keys in changes.items():
            if name in UNRELATED:
                continue
            if name == "endpoints" and all(_endpoint_node(key) != self.node for key in keys):
                continue
            return False
        return self.speaker.best_routes() == self._last_learned

    def _publish(self, result: RouteResult | None, problems: list[str], revision: int, refresh: bool) -> None:
        peers = self.speaker.peer_status() if self.speaker is not None else []
        self.status_diff.publish(
            result,
            peers=peers,
            ident=self._identity,
            problems=problems,
            revision=revision,
            since=self._in_sync_since,
            refresh=refresh,
        )

    def _follow_log_level(self, config: m.ClusterConfig) -> None:
        if self.config.log_level is None and config.log_level != self._log_level:
            apply_log_level(config.log_level, "the cluster config")
            self._log_level = config.log_level

    def _steer_speaker(self, snap: Snapshot, me: m.Node) -> None:
        ident = identity(me, snap.config)
        if self.speaker is None or ident != self._identity:
            if self.speaker is not None:
                log.info("BGP identity of %s changed: restarting the speaker", self.node)
                self.speaker.stop(withdraw=True)
            self.speaker = self._make_speaker(ident)
            self._identity = ident
            self.speaker.on_change(self._bgp_changed)
            self.speaker.start()
        # Most passes come from changes that do not touch the sessions (blocks, pods, BGP updates): plan them only
        # when their inputs changed (the snapshot shares unchanged records, so the comparison is cheap).
        inputs = (self.speaker, snap.nodes, snap.config, snap.bgp_peers)
        if inputs != self._peer_inputs:
            self.speaker.set_peers(
                plan_peers(self.node, snap.nodes, snap.config, snap.bgp_peers.values(), self.config.bgp_defaults)
            )
            self._peer_inputs = inputs
        # BGP before the kernel: a changed announcement is handed to ExaBGP before this pass goes on (other nodes
        # wait for it; our own kernel writes do not).
        self.speaker.announce(
            plan_announcements(self.node, snap.blocks, snap.affinities, snap.local_endpoints(self.node), snap.nodes),
            handoff=ANNOUNCE_HANDOFF,
        )

    def _make_speaker(self, ident: SpeakerIdentity) -> Speaker:
        cfg = SpeakerConfig(
            ident,
            log_level=self.config.exabgp_log_level,
            reactor_speed=self.config.exabgp_reactor_speed,
            bridge_timeout=self.config.bridge_timeout,
        )
        return Speaker(cfg, workdir=self.config.workdir, netns=self.config.netns)


def bgp_config_problems(snap: Snapshot, malformed: dict[str, str]) -> list[str]:
    """BGP peer records no session can be made from (undecodable, or naming an unknown node), for the agent's
    status: the peer is skipped, every other session keeps working, and the operator sees why."""
    errors = {**peer_config_errors(snap.bgp_peers.values(), snap.nodes), **malformed_peer_errors(malformed)}
    return [f"BGP peer {name}: {why}" for name, why in sorted(errors.items())]
