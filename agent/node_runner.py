"""A per-node runner: the cache, the BGP speaker, route calculation, the route and device writers and the status
publisher, driven by one loop. The future ``podnet-agent`` daemon hosts the same objects; tests and the lab run
one runner per node namespace (``--netns``), several on one machine.

One pass (on any datastore or BGP change, and about every ``resync`` seconds, jittered by ±10 %, to repair what
someone else broke):

1. nothing touches the kernel until the cache is in sync with etcd;
2. the speaker gets the peer set and our prefixes (``bgp.plan``), and is (re)created when our identity changes;
3. ``agent.calc.routes`` plans routes and devices from the snapshot and the speaker's best routes;
4. the link writer, then the route writer, make the kernel match;
5. status (programmed routes, peers, the agent itself) is handed to the status reporter, which writes it to etcd
   under the runner's lease from its own thread: a slow or absent etcd never delays a pass.

The cluster config's ``logLevel`` sets podnet's loggers (unless ``--log-level`` was given: the command line wins).

Learned routes are only removed once BGP is in sync too: after a (graceful) restart the RIB starts empty while the
kernel still forwards with the routes of the previous run; they are kept until every peer is back (and has had
``settle`` seconds to re-send its routes) or ``startup_grace`` has passed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import ipaddress
import logging
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent.cache import Cache
from agent.calc.routes import RoutePlan, plan_routes
from agent.calc.snapshot import Snapshot
from agent.dataplane.links import LinkWriter
from agent.dataplane.netlink import Netlink
from agent.dataplane.routes import RouteResult, RouteWriter
from agent.logs import apply_log_level
from agent.status import StatusPublisher, StatusReporter
from bgp import speaker as speaker_module
from bgp.plan import (
    Defaults,
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

log = logging.getLogger("agent.node_runner")  # not __name__: run with -m, that is __main__, outside podnet's loggers
ANNOUNCE_HANDOFF = 0.05  # seconds a pass waits at most for the speaker to start sending a changed announcement
# Per-hop timestamps for latency analysis (--trace FILE; bench/routes_convergence.py --trace).
trace = logging.getLogger("podnet.trace.runner")


@dataclass(frozen=True)
class RunnerConfig:
    node: str
    workdir: Path  # the speaker's files (ExaBGP config, bridge socket, log)
    netns: str | None = None  # run the dataplane and ExaBGP in this network namespace
    bgp_defaults: Defaults = field(default_factory=Defaults)
    resync: float = 10.0
    bgp_poll: float = 0.5
    coalesce_quiet: float = 0.001  # a pass starts once changes pause this long...
    coalesce_max: float = 0.01  # ...or this long after the first change of a burst
    settle: float = 2.0
    startup_grace: float = 30.0
    status_ttl: int = 20
    exabgp_log_level: str = "INFO"
    log_level: str | None = None  # podnet's loggers, fixed (a command-line flag); None: the cluster config's
    exabgp_reactor_speed: float = SpeakerConfig.reactor_speed  # ExaBGP's idle poll is speed/100 s (docs/bgp.md)
    # Seconds ExaBGP may run without its API bridge before the speaker restarts it (slow machines, emulated
    # guests: raise it). The speaker's default, read when the config is made.
    bridge_timeout: float = field(default_factory=lambda: speaker_module.BRIDGE_TIMEOUT)

    def __post_init__(self) -> None:
        if not self.bridge_timeout > 0:
            raise ValueError(f"bridge_timeout must be positive, not {self.bridge_timeout!r}")


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class NodeRunner:
    def __init__(
        self,
        client: EtcdClient,
        config: RunnerConfig,
        *,
        cache: Cache | None = None,
        reporter: StatusReporter | None = None,
        publish_agent: bool = True,
    ) -> None:
        """``cache`` and ``reporter``: shared with the rest of ``podnet-agent`` (then started and stopped by it);
        by default the runner makes its own. ``publish_agent=False``: the owner composes the agent's status key
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
        self.publish_agent = publish_agent
        # For the owner's health and status (read from other threads: each is replaced, never mutated).
        self.last_progress = time.monotonic()  # the loop's last round
        self.applied_revision: int | None = None  # the datastore revision the kernel's routes were computed from
        self.agent_view: m.AgentStatus | None = None  # what the runner would publish as the agent's status
        self.speaker: Speaker | None = None
        self._identity: SpeakerIdentity | None = None
        self._peer_inputs: tuple[object, ...] = ()  # what the speaker's peer set was last planned from
        self._peers_published: dict[str, m.BGPPeerStatus] = {}
        self._thread: threading.Thread | None = None
        self._started = time.monotonic()
        self._all_up_since: float | None = None
        self._recheck_at: float | None = None  # when BGP may count as settled: pass again then
        self._learned_in_sync = False
        self._learned_seen: set[str] = set()  # prefixes BGP delivered during this run, until BGP is in sync
        self._last_learned: dict[str, LearnedRoute] = {}
        self._next_verify = 0.0  # when the next verifying pass is due
        self._verify_due = True
        self._withdrawn_done: set[str] = set()
        self._agent_published: m.AgentStatus | None = None  # what was last handed to the reporter
        self._log_level: str | None = None  # the cluster's level last applied
        self._in_sync_since = ""
        self._was_in_sync = False
        # What the last pass did, for tests and the future daemon's health endpoint.
        self.last_plan: RoutePlan | None = None
        self.last_result: RouteResult | None = None
        self.passes = 0

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def start(self, spawn: Callable[[str, Callable[[], None]], threading.Thread] | None = None) -> NodeRunner:
        """``spawn(name, target)`` starts the loop's thread (the daemon's supervised threads); default: a plain
        daemon thread."""
        self._started = time.monotonic()
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
        """Ready the way calico-node's ``-bird-ready`` means it: within ``startup_grace`` of start every configured
        peer Established, after it at least one; no peers: ready."""
        speaker = self.speaker
        if speaker is None:
            return False, "bgp: speaker not started (waiting for the datastore and this node's record)"
        peers = [p for p in speaker.peer_status() if p.state != "Invalid"]
        up = sum(1 for p in peers if p.state == "Established")
        text = f"bgp: {up} of {len(peers)} peers established"
        if not peers:
            return True, "bgp: no peers configured"
        if time.monotonic() - self._started < self.config.startup_grace:
            return up == len(peers), text
        return up > 0, text

    @property
    def bgp_in_sync(self) -> bool:
        """BGP has caught up since start: a learned route missing now is a real withdrawal."""
        return self._learned_in_sync

    def wake(self) -> None:
        self._wake.set()

    def _datastore_changed(self) -> None:
        if trace.isEnabledFor(logging.DEBUG):
            trace.debug("datastore-change")
        self._wake.set()

    def _bgp_changed(self) -> None:
        if trace.isEnabledFor(logging.DEBUG):
            trace.debug("bgp-change")
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.last_progress = time.monotonic()
            deadline = self._next_verify if self._recheck_at is None else min(self._next_verify, self._recheck_at)
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
                log.exception("runner pass failed; retrying")
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
            self._agent_published = None
            self._offer_agent(m.AgentStatus(self.node, False, snap.revision, since=self._in_sync_since))
            return
        self._follow_log_level(snap.config)
        me = snap.nodes.get(self.node)
        if me is None:
            # Without our record we know neither our address nor our subnet. Leave the kernel as it is (a record
            # deleted by mistake must not cut the node off) and say why.
            why = f"no node record for {self.node}: BGP not started, kernel left as it is"
            self._agent_published = None
            self._offer_agent(m.AgentStatus(self.node, True, snap.revision, since=self._in_sync_since, problems=(why,)))
            return
        problems = bgp_config_problems(snap, self.cache.malformed())
        self._steer_speaker(snap, me)
        self._last_learned = self.speaker.best_routes() if self.speaker is not None else {}
        learned = list(self._last_learned.values())
        learned_in_sync = self._bgp_in_sync()
        withdrawn = self._withdrawn(learned, learned_in_sync)
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

    def _publish(self, result: RouteResult | None, problems: list[str], revision: int, refresh: bool) -> None:
        """Write what changed; ``refresh`` (the verifying passes) also writes what is only counted (peers' prefix
        counts, our revision)."""
        statuses = {}
        for cidr, done in (result.programmed if result is not None else {}).items():
            st = done.route.status(self.node)
            statuses[cidr] = m.RouteStatus(
                st.node, st.cidr, st.type, st.via, done.dev, st.encapsulation, st.learned_from
            )
        self.reporter.offer_routes(statuses)
        peers = self._peer_statuses(refresh)
        self.reporter.offer_peers(peers)
        self._peers_published = peers
        ident = self._identity
        agent = m.AgentStatus(
            node=self.node,
            in_sync=True,
            revision=revision,
            router_id=None if ident is None else ident.router_id,
            as_number=None if ident is None else ident.as_number,
            since=self._in_sync_since,
            problems=tuple(problems),
        )
        # The revision moves with every datastore change: alone, it is refreshed by the verifying passes, not each
        # pass (one etcd write per node per change would be the cluster's busiest traffic).
        self.agent_view = agent
        last = self._agent_published
        if last is not None and not refresh and dataclasses.replace(last, revision=revision) == agent:
            return
        self._offer_agent(agent)
        self._agent_published = agent

    def _offer_agent(self, agent: m.AgentStatus) -> None:
        self.agent_view = agent
        if self.publish_agent:
            self.reporter.offer_agent(agent)

    def _withdrawn(self, learned: list[LearnedRoute], learned_in_sync: bool) -> set[str]:
        """Prefixes BGP delivered in this run and then withdrew: they leave the kernel even before BGP is in sync.
        Once it is, any learned route missing from the RIB goes anyway, so the set is dropped (it would otherwise
        keep every prefix ever learned, borrowed /32s churning with pods, and be diffed on every pass)."""
        if learned_in_sync:
            self._learned_seen.clear()
            return set()
        current = {str(ipaddress.ip_network(r.prefix)) for r in learned}
        withdrawn = self._learned_seen - current
        self._learned_seen |= current
        return withdrawn

    def _follow_log_level(self, config: m.ClusterConfig) -> None:
        if self.config.log_level is None and config.log_level != self._log_level:
            apply_log_level(config.log_level, "the cluster config")
            self._log_level = config.log_level

    def _peer_statuses(self, refresh: bool) -> dict[str, m.BGPPeerStatus]:
        """The peers' status to publish. Prefix counts move with every route change anywhere (each would cost one
        etcd write per peer on every node, a reflector's fan-out on every event): a peer whose only change is its
        counts keeps its last published record, and counts are written by the verifying passes (``refresh``,
        about every ``resync`` seconds). State changes are published at once."""
        current = {p.address: p.to_status(self.node) for p in (self.speaker.peer_status() if self.speaker else [])}
        if refresh:
            return current
        last = self._peers_published
        out = {}
        for address, st in current.items():
            old = last.get(address)
            same = (
                old is not None
                and dataclasses.replace(old, prefixes_received=st.prefixes_received, prefixes_sent=st.prefixes_sent)
                == st
            )
            out[address] = old if same and old is not None else st
        return out

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

    def _bgp_in_sync(self) -> bool:
        """Latches: once BGP has caught up after start, a route missing from the RIB is a real withdrawal."""
        if self._learned_in_sync:
            return True
        now = time.monotonic()
        peers = self.speaker.peer_status() if self.speaker is not None else []
        all_up = self.speaker is not None and all(p.state in ("Established", "Invalid") for p in peers)
        if not all_up:
            self._all_up_since = None
        elif self._all_up_since is None:
            self._all_up_since = now
        settled = self._all_up_since is not None and now - self._all_up_since >= self.config.settle
        if settled or now - self._started >= self.config.startup_grace:
            self._learned_in_sync = True
            self._recheck_at = None
            log.info("BGP in sync on %s: stale learned routes may now be removed", self.node)
        elif self._all_up_since is not None:
            self._recheck_at = self._all_up_since + self.config.settle
        else:
            self._recheck_at = self._started + self.config.startup_grace
        return self._learned_in_sync


def bgp_config_problems(snap: Snapshot, malformed: dict[str, str]) -> list[str]:
    """BGP peer records no session can be made from (undecodable, or naming an unknown node), for the agent's
    status: the peer is skipped, every other session keeps working, and the operator sees why."""
    errors = {**peer_config_errors(snap.bgp_peers.values(), snap.nodes), **malformed_peer_errors(malformed)}
    return [f"BGP peer {name}: {why}" for name, why in sorted(errors.items())]


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.node_runner", description=__doc__.split("\n")[0])
    parser.add_argument("--node", required=True)
    parser.add_argument("--etcd-endpoints", default="127.0.0.1:2379")
    parser.add_argument("--netns", default=None, help="network namespace of the node (default: our own)")
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--hold-time", type=int, default=Defaults.hold_time)
    parser.add_argument("--graceful-restart-time", type=int, default=Defaults.graceful_restart_time)
    parser.add_argument("--resync", type=float, default=10.0)
    parser.add_argument("--startup-grace", type=float, default=30.0)
    parser.add_argument("--status-ttl", type=int, default=20, help="lease TTL of the status keys (seconds)")
    parser.add_argument(
        "--bridge-timeout",
        type=_positive,
        default=speaker_module.BRIDGE_TIMEOUT,
        help="restart ExaBGP when its API bridge has not connected for this long (seconds, default %(default)s)",
    )
    parser.add_argument(
        "--exabgp-reactor-speed",
        type=_positive,
        default=SpeakerConfig.reactor_speed,
        help="ExaBGP's reactor speed: it polls every speed/100 s when idle (default %(default)s)",
    )
    parser.add_argument(
        "--withdraw-on-exit",
        action="store_true",
        help="on SIGTERM tell peers we are gone (default: a planned restart; peers keep our routes)",
    )
    parser.add_argument(
        "--log-level",
        default=None,
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="podnet's log level (default: the cluster config's logLevel, INFO until it is read)",
    )
    parser.add_argument("--trace", type=Path, help="append per-hop timestamps (route latency analysis) to this file")
    args = parser.parse_args(argv)
    fmt = f"%(asctime)s {args.node} %(name)s %(levelname)s %(message)s"
    logging.basicConfig(level=args.log_level or "INFO", format=fmt)
    if args.trace is not None:
        handler = logging.FileHandler(args.trace)
        handler.setFormatter(logging.Formatter(f"%(created).6f {args.node} %(threadName)s %(message)s"))
        tracer = logging.getLogger("podnet.trace")
        tracer.setLevel(logging.DEBUG)
        tracer.propagate = False
        tracer.addHandler(handler)
    config = RunnerConfig(
        node=args.node,
        workdir=args.workdir,
        netns=args.netns,
        bgp_defaults=Defaults(hold_time=args.hold_time, graceful_restart_time=args.graceful_restart_time),
        resync=args.resync,
        startup_grace=args.startup_grace,
        status_ttl=args.status_ttl,
        bridge_timeout=args.bridge_timeout,
        exabgp_reactor_speed=args.exabgp_reactor_speed,
        log_level=args.log_level,
    )
    client = EtcdClient([e.strip() for e in args.etcd_endpoints.split(",") if e.strip()])
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    runner = NodeRunner(client, config).start()
    print("started", flush=True)
    done.wait()
    runner.stop(withdraw=args.withdraw_on_exit)
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
