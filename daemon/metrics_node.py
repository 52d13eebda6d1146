"""The node agent's own metrics: policy and route writers, dataplane commands, BGP, the datastore watch.

The components only count and time (plain thread-safe objects: ``agent.dataplane.stats``, ``cmd.CommandStats``,
the writers' attributes); these collectors read them when Prometheus scrapes, so recording costs the components a
lock and an addition, and a scrape costs them nothing. Each argument of ``register_node_metrics`` is optional: a
run mode that is off has no such object and its metrics are absent. A collector never raises into the scrape: a
section whose object fails to answer (mid-restart, say) is left out of that scrape and logged once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from typing import Protocol, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from agent.dataplane.programmer import Owned
from agent.dataplane.stats import HistogramSnapshot
from cni.stats import HistogramSnapshot as CniSnapshot
from datastore.model import ROUTE_TYPES

log = logging.getLogger(__name__)

# Every state a peer can be in (``bgp.session``), each exported even at 0 so that alerts see a fall to 0.
BGP_STATES = ("Idle", "Connect", "Active", "OpenSent", "OpenConfirm", "Established", "Invalid")
SYNC_KINDS = ("full", "incremental")
REJECTION_CAUSES = ("invalid", "kernel")
T = TypeVar("T")


# -- what the collectors read (the real objects fit; tests pass small fakes) ------------------------------------------


class Histogram(Protocol):
    def snapshot(self) -> HistogramSnapshot: ...


class Counts(Protocol):
    def snapshot(self) -> Mapping[str, int]: ...


class CommandCounts(Protocol):
    """``agent.dataplane.cmd.CommandStats`` (a ``CommandRunner``'s ``stats``)."""

    @property
    def calls(self) -> Counts: ...
    @property
    def errors(self) -> Counts: ...


class OwnedSource(Protocol):
    def owned(self) -> Owned | None: ...


class PolicyWriter(Protocol):
    """``agent.dataplane.policy_syncer.PolicySyncer``."""

    @property
    def durations(self) -> Mapping[str, Histogram]: ...
    @property
    def failures(self) -> int: ...
    @property
    def last_revision(self) -> int | None: ...
    @property
    def last_sync_time(self) -> float | None: ...
    @property
    def refusals(self) -> Mapping[str, object]: ...
    @property
    def dataplane(self) -> OwnedSource: ...


class Verdict(Protocol):
    @property
    def accepted(self) -> bool: ...


class PolicyVerdicts(Protocol):
    """``agent.policy_feed.PolicyFeed``: the latest status of every policy, keyed (namespace, name)."""

    @property
    def statuses(self) -> Mapping[tuple[str, str], Verdict]: ...


class Timed(Protocol):
    @property
    def durations(self) -> Mapping[str, Histogram]: ...


class RouteStats(Timed, Protocol):
    """``agent.dataplane.routes.RouteWriter``."""

    @property
    def programmed_by_type(self) -> Mapping[str, int]: ...
    @property
    def failed_count(self) -> int: ...


class LinkStats(Timed, Protocol):
    """``agent.dataplane.links.LinkWriter``."""

    @property
    def problem_count(self) -> int: ...


class Peer(Protocol):
    @property
    def address(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def prefixes_received(self) -> int: ...
    @property
    def prefixes_sent(self) -> int: ...


class BgpSpeaker(Protocol):
    """``bgp.speaker.Speaker``."""

    def peer_status(self) -> Sequence[Peer]: ...
    def rejected_routes(self) -> Mapping[str, Mapping[str, int]]: ...
    @property
    def exabgp_pid(self) -> int | None: ...
    @property
    def bridge_pid(self) -> int | None: ...
    @property
    def restarts(self) -> int: ...


class WatchStats(Protocol):
    """``datastore.watcher.Watcher``."""

    @property
    def snapshots(self) -> int: ...
    @property
    def reconnects(self) -> int: ...
    @property
    def stalls(self) -> int: ...
    @property
    def errors(self) -> int: ...


class CacheView(Protocol):
    @property
    def revision(self) -> int: ...
    @property
    def in_sync(self) -> bool: ...
    def local_endpoints(self, node: str) -> Sized: ...


class DatastoreCache(Protocol):
    """``agent.cache.Cache``."""

    @property
    def watchers(self) -> Sequence[WatchStats]: ...
    def snapshot(self) -> CacheView: ...


# -- collectors -----------------------------------------------------------------------------------------------------


Section = Callable[[], Iterable[Metric]]


class SectionCollector:
    """Yields the families of each section; a section that raises is skipped (logged when it starts failing and
    when it recovers), never failing the scrape."""

    def __init__(self, sections: Mapping[str, Section]) -> None:
        self._sections = dict(sections)
        self._failing: set[str] = set()

    def collect(self) -> Iterable[Metric]:
        out: list[Metric] = []
        for name, section in self._sections.items():
            try:
                metrics = list(section())
            except Exception as exc:
                if name not in self._failing:
                    self._failing.add(name)
                    log.warning("metrics: %s left out of the scrape: %s: %s", name, type(exc).__name__, exc)
                continue
            if name in self._failing:
                self._failing.discard(name)
                log.info("metrics: %s answers again", name)
            out.extend(metrics)
        return out

    def describe(self) -> Iterable[Metric]:
        return self.collect()  # cheap, and never raises


def histogram(name: str, doc: str, by_kind: Mapping[str, Histogram], kinds: Sequence[str] = SYNC_KINDS) -> Metric:
    family = HistogramMetricFamily(name, doc, labels=["kind"])
    for kind in kinds:
        h = by_kind.get(kind)
        if h is None:
            continue
        snap = h.snapshot()
        buckets = [(str(float(b)), float(c)) for b, c in zip(snap.bounds, snap.cumulative, strict=False)]
        buckets.append(("+Inf", float(snap.count)))
        family.add_metric([kind], buckets, snap.sum)
    return family


def gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc)
    if value is not None:
        family.add_metric([], float(value))
    return family


def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=float(value))  # exposed as ``<name>_total``


def labelled(family: GaugeMetricFamily | CounterMetricFamily, values: Mapping[str, float]) -> Metric:
    for label, value in sorted(values.items()):
        family.add_metric([label], float(value))
    return family


def policy_sync(policy: PolicyWriter) -> Iterable[Metric]:
    yield histogram(
        "podnet_policy_sync_duration_seconds",
        "Seconds per successful policy sync (full: the kernel read back; incremental: a change written)",
        policy.durations,
    )
    yield counter("podnet_policy_sync_errors", "Policy syncs that failed (each is retried)", policy.failures)
    yield gauge(
        "podnet_policy_synced_revision",
        "Datastore revision the policy dataplane reflects (its last successful sync)",
        policy.last_revision,
    )
    yield gauge(
        "podnet_policy_last_sync_timestamp_seconds",
        "Unix time of the end of the last successful policy sync",
        policy.last_sync_time,
    )


def policy_owned(policy: PolicyWriter) -> Iterable[Metric]:
    # None before the first sync (or after a failure, until the next one reads the kernel back): unknown, so the
    # families are there without samples rather than saying 0.
    held = policy.dataplane.owned()
    yield labelled(
        GaugeMetricFamily("podnet_policy_owned_chains", "podnet chains in the kernel", labels=["table"]),
        held.chains if held is not None else {},
    )
    yield labelled(
        GaugeMetricFamily("podnet_policy_owned_rules", "Rules in podnet chains", labels=["table"]),
        held.rules if held is not None else {},
    )
    sets, members = (None, None) if held is None else (held.ipsets, held.members)
    yield gauge("podnet_policy_owned_ipsets", "podnet ipsets in the kernel", sets)
    yield gauge("podnet_policy_ipset_members", "Members of all podnet ipsets", members)


def policy_verdicts(feed: PolicyVerdicts, policy: PolicyWriter | None) -> Iterable[Metric]:
    refused = set(policy.refusals) if policy is not None else set()
    rejected = dict.fromkeys(REJECTION_CAUSES, 0)
    active = 0
    for (namespace, name), status in feed.statuses.items():
        if status.accepted:
            active += 1
        else:
            rejected["kernel" if f"{namespace}/{name}" in refused else "invalid"] += 1
    yield gauge("podnet_policies_active", "Policies enforced as written", active)
    yield labelled(
        GaugeMetricFamily(
            "podnet_policies_rejected",
            "Policies not enforced as written (their pods stay isolated by them): invalid, or refused by the kernel",
            labels=["cause"],
        ),
        rejected,
    )


def dataplane_commands(commands: CommandCounts) -> Iterable[Metric]:
    calls, errors = commands.calls.snapshot(), commands.errors.snapshot()
    yield labelled(
        CounterMetricFamily(
            "podnet_dataplane_command", "Dataplane tool runs (iptables-restore, ipset, ...)", labels=["tool"]
        ),
        calls,
    )
    yield labelled(
        CounterMetricFamily(
            "podnet_dataplane_command_errors",
            "Dataplane tool runs that failed (non-zero exit or timeout)",
            labels=["tool"],
        ),
        {tool: errors.get(tool, 0) for tool in calls},
    )


def route_writer(routes: RouteStats) -> Iterable[Metric]:
    yield histogram(
        "podnet_route_apply_duration_seconds",
        "Seconds per route writer pass (full: the routing table read back; incremental: from its model)",
        routes.durations,
    )
    by_type = routes.programmed_by_type
    yield labelled(
        GaugeMetricFamily(
            "podnet_routes_programmed", "Routes in the kernel as the last pass left them", labels=["type"]
        ),
        {t: by_type.get(t, 0) for t in (*ROUTE_TYPES, *by_type)},
    )
    yield gauge("podnet_routes_failed", "Routes the last pass could not program", routes.failed_count)


def link_writer(links: LinkStats) -> Iterable[Metric]:
    yield histogram(
        "podnet_link_apply_duration_seconds",
        "Seconds per tunnel device pass (vxlan.podnet with its FDB and neighbours, tunl0)",
        links.durations,
    )
    yield gauge("podnet_link_problems", "Tunnel device problems found by the last pass", links.problem_count)


def bgp(speaker: BgpSpeaker | None) -> Iterable[Metric]:
    """No speaker (not created yet, or between two): every state at 0."""
    peers = list(speaker.peer_status()) if speaker is not None else []
    rejected = speaker.rejected_routes() if speaker is not None else {}
    states = dict.fromkeys(BGP_STATES, 0)
    for p in peers:
        states[p.state] = states.get(p.state, 0) + 1
    yield labelled(
        GaugeMetricFamily("podnet_bgp_peers", "Configured BGP peers by session state", labels=["state"]), states
    )
    received = GaugeMetricFamily("podnet_bgp_prefixes_received", "Prefixes a peer announces to us", labels=["peer"])
    sent = GaugeMetricFamily("podnet_bgp_prefixes_sent", "Prefixes we announce to a peer", labels=["peer"])
    for p in peers:
        if p.state != "Invalid":
            received.add_metric([p.address], float(p.prefixes_received))
            sent.add_metric([p.address], float(p.prefixes_sent))
    yield received
    yield sent
    yield labelled(
        CounterMetricFamily(
            "podnet_bgp_routes_rejected",
            "Routes refused on receipt since the speaker started (as-loop, as-zero, reflection-loop, own-next-hop)",
            labels=["reason"],
        ),
        {reason: sum(by_peer.values()) for reason, by_peer in rejected.items()},
    )


def process_usage(pid: int) -> tuple[float, int] | None:
    """CPU seconds (user + system) and resident bytes of a process, from /proc; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the command name may hold spaces and parentheses
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)
    return cpu, int(fields[21]) * os.sysconf("SC_PAGE_SIZE")  # rss (field 24), in pages


def bgp_processes(speaker: BgpSpeaker) -> Iterable[Metric]:
    """ExaBGP and its API bridge are processes of their own: the agent's ``process_*`` metrics do not cover them."""
    cpu = CounterMetricFamily(
        "podnet_bgp_process_cpu_seconds", "CPU time of the speaker's ExaBGP and API bridge", labels=["process"]
    )
    rss = GaugeMetricFamily(
        "podnet_bgp_process_resident_memory_bytes",
        "Resident memory of the speaker's ExaBGP and API bridge",
        labels=["process"],
    )
    for name, pid in (("exabgp", speaker.exabgp_pid), ("bridge", speaker.bridge_pid)):
        usage = process_usage(pid) if pid is not None else None
        if usage is not None:
            cpu.add_metric([name], usage[0])
            rss.add_metric([name], float(usage[1]))
    yield cpu
    yield rss
    yield counter(
        "podnet_bgp_exabgp_restarts", "Times ExaBGP exited and the speaker started it again", speaker.restarts
    )


def datastore(cache: DatastoreCache, node: str | None) -> Iterable[Metric]:
    watchers = list(cache.watchers)
    yield counter(
        "podnet_datastore_reconnects", "Watch streams resumed after one broke", sum(w.reconnects for w in watchers)
    )
    yield counter(
        "podnet_datastore_snapshots",
        "Full reads of a watched prefix (one at start, one per compaction or rewind)",
        sum(w.snapshots for w in watchers),
    )
    yield counter(
        "podnet_datastore_watch_stalls",
        "Watch streams given up on because they stopped answering",
        sum(w.stalls for w in watchers),
    )
    yield counter(
        "podnet_datastore_errors", "Unexpected problems in the watch (logged)", sum(w.errors for w in watchers)
    )
    snap = cache.snapshot()
    yield gauge("podnet_datastore_revision", "Datastore revision the cache has reached", snap.revision)
    yield gauge("podnet_datastore_in_sync", "1 once the cache holds a full snapshot, else 0", int(snap.in_sync))
    if node is not None:
        yield gauge(
            "podnet_local_endpoints", "Pod endpoints on this node in the datastore", len(snap.local_endpoints(node))
        )


class CniHistogram(Protocol):
    def snapshot(self) -> CniSnapshot: ...


class CniCalls(Protocol):
    """``cni.stats.CniStats``, or ``cni.stats.StatsCopy`` (as the CNI server's child process reported it)."""

    @property
    def latency(self) -> Mapping[str, CniHistogram]: ...
    def requests(self) -> Mapping[str, int]: ...
    def errors(self) -> Mapping[str, int]: ...


def cni_server(stats: CniCalls) -> Iterable[Metric]:
    family = HistogramMetricFamily(
        "podnet_cni_request_duration_seconds",
        "Seconds the CNI server took to answer a call (ADD, DEL, CHECK), errors included",
        labels=["command"],
    )
    for command, h in sorted(stats.latency.items()):
        snap = h.snapshot()
        buckets = [(str(float(b)), float(c)) for b, c in zip(snap.bounds, snap.cumulative, strict=False)]
        buckets.append(("+Inf", float(snap.samples)))
        family.add_metric([command], buckets, snap.sum)
    yield family
    yield labelled(
        CounterMetricFamily("podnet_cni_requests", "CNI calls answered, by command (INVALID: unreadable)",
                            labels=["command"]),
        dict(stats.requests()),
    )  # fmt: skip
    yield labelled(
        CounterMetricFamily("podnet_cni_errors", "CNI calls answered with an error, by command", labels=["command"]),
        dict(stats.errors()),
    )


def following(of: Callable[[], T | None], metrics: Callable[[T], Iterable[Metric]]) -> Section:
    """A section reading the object ``of`` returns at each scrape; none while it returns None."""

    def read() -> Iterable[Metric]:
        obj = of()
        return () if obj is None else metrics(obj)

    return read


def register_node_metrics(
    registry: CollectorRegistry,
    *,
    node: str | None = None,
    cache_of: Callable[[], DatastoreCache | None] | None = None,
    policy_of: Callable[[], PolicyWriter | None] | None = None,
    verdicts_of: Callable[[], PolicyVerdicts | None] | None = None,
    commands_of: Callable[[], CommandCounts | None] | None = None,
    routes_of: Callable[[], RouteStats | None] | None = None,
    links_of: Callable[[], LinkStats | None] | None = None,
    speaker_of: Callable[[], BgpSpeaker | None] | None = None,
    cni_of: Callable[[], CniCalls | None] | None = None,
) -> SectionCollector:
    """Register the metrics of the objects the ``*_of`` callables return, asked at every scrape: an object made
    when its component starts, or replaced (the router's speaker), is followed; while one returns None its
    metrics are absent (the BGP peer states read 0). An argument left None (a run mode that is off) adds nothing.
    ``node`` with ``cache_of``: this node's endpoints are counted. ``commands_of``: the policy writer's
    ``CommandRunner.stats``."""
    sections: dict[str, Section] = {}
    if cache_of is not None:
        sections["datastore"] = following(cache_of, lambda cache: datastore(cache, node))
    if policy_of is not None:
        sections["policy sync"] = following(policy_of, policy_sync)
        sections["policy dataplane"] = following(policy_of, policy_owned)
    if verdicts_of is not None:
        of_policy = policy_of or (lambda: None)
        sections["policy verdicts"] = following(verdicts_of, lambda feed: policy_verdicts(feed, of_policy()))
    if commands_of is not None:
        sections["dataplane commands"] = following(commands_of, dataplane_commands)
    if routes_of is not None:
        sections["routes"] = following(routes_of, route_writer)
    if links_of is not None:
        sections["links"] = following(links_of, link_writer)
    if speaker_of is not None:
        of_speaker = speaker_of
        sections["bgp"] = lambda: bgp(of_speaker())
        sections["bgp processes"] = following(speaker_of, bgp_processes)
    if cni_of is not None:
        sections["cni"] = following(cni_of, cni_server)
    collector = SectionCollector(sections)
    registry.register(collector)
    return collector
