"""The node agent's metrics (daemon/metrics_node.py) as Prometheus scrapes them: rendered with prometheus_client,
parsed back with its parser and checked with ``promtool check metrics``.

The writers are the real ones (PolicySyncer over a PolicyDataplane, RouteWriter, LinkWriter, the cache); only what
lies under them is stood in for: the iptables/ipset tools are ``sh`` processes that swallow their input (so the
CommandRunner counts real process runs), netlink is a small fake table. The real kernel's side: the agent's netns test.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.cache import WATCHED, Cache
from agent.calc.policy import PolicyStatus
from agent.calc.routes import Route, RoutePlan
from agent.calc.state import Chain, DataplaneState, IpSet
from agent.dataplane.backend import Backend
from agent.dataplane.cmd import CommandRunner, tool_of
from agent.dataplane.iptables import Iptables
from agent.dataplane.links import LinkWriter
from agent.dataplane.netlink import Netlink
from agent.dataplane.policy_syncer import Desired, PolicySyncer
from agent.dataplane.programmer import PolicyDataplane
from agent.dataplane.routes import RouteWriter
from agent.dataplane.stats import Histogram
from bgp.session import PeerState
from daemon.metrics import new_registry
from daemon.metrics_node import register_node_metrics
from daemon.node import NodeAgent
from datastore import keys as k
from datastore import model as m
from datastore.watcher import InSync, Updated, Watcher

NODE = "node-1"


@dataclass(frozen=True)
class FakeTools(CommandRunner):
    """Runs ``sh`` instead of each tool: it reads the input and prints nothing (an empty kernel that takes every
    write); a tool named in ``failing`` exits 1 with a complaint instead."""

    failing: tuple[str, ...] = ()

    def argv(self, cmd: Sequence[str]) -> list[str]:
        if tool_of(cmd) in self.failing:
            return ["sh", "-c", "cat >/dev/null; echo 'refused by the fake kernel' >&2; exit 1"]
        return ["sh", "-c", "cat >/dev/null"]


def state(rule: str, members: frozenset[str] = frozenset({"10.244.1.5", "10.244.1.6"})) -> DataplaneState:
    chains = {
        "podnet-pi-a": Chain("podnet-pi-a", (f"-s {rule} -j MARK --set-xmark 0x10000/0x10000", "-j RETURN")),
        "podnet-tw-x": Chain("podnet-tw-x", ("-j podnet-pi-a",)),
    }
    return DataplaneState(ipsets={"podnet-s-a": IpSet("podnet-s-a", "hash:ip", members)}, tables={"filter": chains})


class Source:
    def __init__(self) -> None:
        self.revision = 7
        self.state = state("10.0.0.1")

    def desired(self) -> Desired:
        return Desired(self.revision, self.state)


class FakeIpr:
    """Netlink's route and link calls over an empty main table that takes every write."""

    def __init__(self) -> None:
        self.written: list[dict[str, Any]] = []

    def route(self, op: str, **kw: Any) -> list[Any]:
        if op == "replace":
            self.written.append(kw)
        return []

    def link(self, op: str, **kw: Any) -> list[Any]:
        return [{"index": 1, "ifname": "lo"}, {"index": 2, "ifname": "eth0"}, {"index": 3, "ifname": "cali1"}]


class FakeNetlink(Netlink):
    def __init__(self) -> None:
        super().__init__()
        self._ipr = FakeIpr()


@dataclass
class FakeSpeaker:
    peers: list[PeerState] = field(default_factory=list)
    rejected: dict[str, dict[str, int]] = field(default_factory=dict)
    broken: bool = False
    exabgp_pid: int | None = None
    bridge_pid: int | None = None
    restarts: int = 0

    def peer_status(self) -> list[PeerState]:
        if self.broken:
            raise RuntimeError("speaker is restarting")
        return self.peers

    def rejected_routes(self) -> dict[str, dict[str, int]]:
        return self.rejected


@dataclass
class FakeFeed:
    statuses: Mapping[tuple[str, str], PolicyStatus] = field(default_factory=dict)


def scrape(registry: CollectorRegistry) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """The exposition text and its samples, parsed back: (name, sorted labels) -> value."""
    text = generate_latest(registry).decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return text, samples


def value(samples: Mapping[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: scripts/bootstrap installs it (Debian package prometheus)")
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout + proc.stderr == ""  # no lint warning either


@dataclass
class Node:
    registry: CollectorRegistry
    source: Source
    syncer: PolicySyncer
    tools: FakeTools
    routes: RouteWriter
    links: LinkWriter
    cache: Cache
    speaker: FakeSpeaker
    feed: FakeFeed
    speaker_present: list[bool] = field(default_factory=lambda: [True])


@pytest.fixture
def node() -> Iterator[Node]:
    tools = FakeTools()
    source = Source()
    syncer = PolicySyncer(PolicyDataplane(tools, Backend("nft")), source.desired)
    nl = FakeNetlink()
    routes, links = RouteWriter(nl), LinkWriter(nl)
    cache = Cache(None)
    speaker, feed = FakeSpeaker(), FakeFeed()
    registry = new_registry()
    n = Node(registry, source, syncer, tools, routes, links, cache, speaker, feed)
    register_node_metrics(
        registry,
        node=NODE,
        cache_of=lambda: cache,
        policy_of=lambda: syncer,
        verdicts_of=lambda: feed,
        commands_of=lambda: syncer.dataplane.runner.stats,
        routes_of=lambda: routes,
        links_of=lambda: links,
        speaker_of=lambda: speaker if n.speaker_present[0] else None,
    )
    yield n


def test_a_policy_sync_that_writes_raises_the_restore_counter_and_times_the_sync(node: Node) -> None:
    _, before = scrape(node.registry)
    # Before any sync: counters at nothing, the kernel's podnet content unknown (no sample rather than a false 0).
    assert ("podnet_dataplane_command_total", (("tool", "iptables-restore"),)) not in before
    assert value(before, "podnet_policy_sync_duration_seconds_count", kind="full") == 0
    assert ("podnet_policy_owned_ipsets", ()) not in before

    node.syncer.sync_once()  # the first sync: full (reads the kernel back), then writes everything
    _, first = scrape(node.registry)
    assert value(first, "podnet_dataplane_command_total", tool="iptables-save") == 1
    assert value(first, "podnet_dataplane_command_total", tool="iptables-restore") == 1
    assert value(first, "podnet_dataplane_command_errors_total", tool="iptables-restore") == 0
    assert value(first, "podnet_dataplane_command_total", tool="ipset") == 2  # save, then restore
    assert value(first, "podnet_policy_sync_duration_seconds_count", kind="full") == 1
    assert value(first, "podnet_policy_sync_duration_seconds_count", kind="incremental") == 0
    assert value(first, "podnet_policy_sync_duration_seconds_bucket", kind="full", le="+Inf") == 1
    assert value(first, "podnet_policy_sync_duration_seconds_sum", kind="full") > 0
    assert value(first, "podnet_policy_synced_revision") == 7
    assert value(first, "podnet_policy_owned_chains", table="filter") == 2
    assert value(first, "podnet_policy_owned_rules", table="filter") == 3
    assert value(first, "podnet_policy_owned_ipsets") == 1
    assert value(first, "podnet_policy_ipset_members") == 2

    # A change of one rule: one incremental sync, one more iptables-restore, no read of the tables.
    node.source.revision, node.source.state = 8, state("10.0.0.2", frozenset({"10.244.1.5"}))
    node.syncer.sync_once()
    _, second = scrape(node.registry)
    assert value(second, "podnet_dataplane_command_total", tool="iptables-restore") == 2
    assert value(second, "podnet_dataplane_command_total", tool="iptables-save") == 1
    assert value(second, "podnet_policy_sync_duration_seconds_count", kind="incremental") == 1
    assert value(second, "podnet_policy_synced_revision") == 8
    assert value(second, "podnet_policy_ipset_members") == 1

    # Nothing changed: a sync writes nothing, the counter stays.
    node.syncer.sync_once()
    _, third = scrape(node.registry)
    assert value(third, "podnet_dataplane_command_total", tool="iptables-restore") == 2
    assert value(third, "podnet_policy_sync_duration_seconds_count", kind="incremental") == 2


def test_failing_tools_are_counted_by_tool() -> None:
    tools = FakeTools(failing=("iptables-restore",))
    source = Source()
    syncer = PolicySyncer(PolicyDataplane(tools, Backend("legacy")), source.desired)
    registry = CollectorRegistry()
    register_node_metrics(registry, policy_of=lambda: syncer, commands_of=lambda: tools.stats)
    with pytest.raises(RuntimeError, match="refused by the fake kernel"):
        syncer.sync_once()
    text, samples = scrape(registry)
    calls = value(samples, "podnet_dataplane_command_total", tool="iptables-restore")
    assert calls >= 1
    assert value(samples, "podnet_dataplane_command_errors_total", tool="iptables-restore") == calls
    assert value(samples, "podnet_dataplane_command_errors_total", tool="ipset") == 0
    assert value(samples, "podnet_policy_sync_duration_seconds_count", kind="full") == 0  # only successful syncs
    assert ("podnet_policy_synced_revision", ()) not in samples
    promtool_check(text)


def test_tools_are_named_without_their_backend() -> None:
    assert tool_of(["iptables-nft-restore", "--noflush"]) == "iptables-restore"
    assert tool_of(["iptables-legacy-save"]) == "iptables-save"
    assert tool_of(["ip6tables-nft"]) == "ip6tables"
    assert tool_of(["/usr/sbin/ipset", "restore"]) == "ipset"
    # The built-in chains are re-read by a shell running iptables -S: counted as iptables.
    tools = FakeTools()
    Iptables(tools, Backend("nft")).start_listing({"filter": ["FORWARD", "INPUT"]}).result()
    assert tools.stats.calls.snapshot() == {"iptables": 1}


def test_routes_programmed_by_type_and_pass_durations(node: Node) -> None:
    plan = {
        "10.244.1.0/26": Route("10.244.1.0/26", "local-block", blackhole=True),
        "10.244.1.5/32": Route("10.244.1.5/32", "local-pod", dev="cali1"),
        "10.244.2.0/26": Route("10.244.2.0/26", "remote-block", via="192.168.77.2"),
        "10.244.3.0/26": Route("10.244.3.0/26", "remote-block", via="192.168.77.3"),
        "10.244.4.0/26": Route("10.244.4.0/26", "remote-block", dev="nosuch0"),  # fails: no such device
    }
    node.routes.apply(plan, in_sync=False)
    node.links.apply(RoutePlan(plan), in_sync=False)
    node.routes.apply(plan, in_sync=False, verify=False)
    _, s = scrape(node.registry)
    assert value(s, "podnet_routes_programmed", type="remote-block") == 2
    assert value(s, "podnet_routes_programmed", type="local-block") == 1
    assert value(s, "podnet_routes_programmed", type="local-pod") == 1
    assert value(s, "podnet_routes_programmed", type="borrowed") == 0  # every type, so a fall to 0 is seen
    assert value(s, "podnet_routes_failed") == 1
    assert value(s, "podnet_route_apply_duration_seconds_count", kind="full") == 1
    assert value(s, "podnet_route_apply_duration_seconds_count", kind="incremental") == 1
    assert value(s, "podnet_link_apply_duration_seconds_count", kind="full") == 1
    assert value(s, "podnet_link_problems") == 0


def test_bgp_peers_by_state_prefixes_and_rejections(node: Node) -> None:
    node.speaker.peers = [
        PeerState("192.168.77.2", "node", "node-2", "Established", "", "", 64512, 3, 1),
        PeerState("192.168.77.3", "node", "node-3", "Active", "", "", 64512),
        PeerState("192.168.77.9", "global", "bad", "Invalid", "", "no AS", 0),
    ]
    node.speaker.rejected = {"as-loop": {"192.168.77.2": 2, "192.168.77.3": 1}}
    text, s = scrape(node.registry)
    assert value(s, "podnet_bgp_peers", state="Established") == 1
    assert value(s, "podnet_bgp_peers", state="Active") == 1
    assert value(s, "podnet_bgp_peers", state="Invalid") == 1
    assert value(s, "podnet_bgp_peers", state="Idle") == 0
    assert value(s, "podnet_bgp_prefixes_received", peer="192.168.77.2") == 3
    assert value(s, "podnet_bgp_prefixes_sent", peer="192.168.77.2") == 1
    assert value(s, "podnet_bgp_prefixes_received", peer="192.168.77.3") == 0
    assert ("podnet_bgp_prefixes_received", (("peer", "192.168.77.9"),)) not in s  # no session: no counts
    assert value(s, "podnet_bgp_routes_rejected_total", reason="as-loop") == 3
    promtool_check(text)

    node.speaker_present[0] = False  # the runner is between two speakers
    _, s = scrape(node.registry)
    assert value(s, "podnet_bgp_peers", state="Established") == 0


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def test_the_speakers_processes_cpu_and_memory(node: Node) -> None:
    child = subprocess.Popen(["sh", "-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; exec sleep 30"])
    try:
        node.speaker.exabgp_pid, node.speaker.bridge_pid, node.speaker.restarts = child.pid, 2**22 + 7, 2
        deadline = time.monotonic() + 10
        # Until the busy loop is done (its CPU time counted) and sleep has settled (its memory no longer growing).
        while time.monotonic() < deadline and not (
            "sleep" in read(f"/proc/{child.pid}/cmdline") and read(f"/proc/{child.pid}/stat").split(") ")[1][0] == "S"
        ):
            time.sleep(0.05)
        text, s = scrape(node.registry)
        status = read(f"/proc/{child.pid}/status")
        rss = int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024
        assert value(s, "podnet_bgp_process_resident_memory_bytes", process="exabgp") == pytest.approx(rss, rel=0.2)
        assert value(s, "podnet_bgp_process_cpu_seconds_total", process="exabgp") > 0
        assert ("podnet_bgp_process_cpu_seconds_total", (("process", "bridge"),)) not in s  # no such process
        assert value(s, "podnet_bgp_exabgp_restarts_total") == 2
        promtool_check(text)
    finally:
        child.kill()
        child.wait()
    _, s = scrape(node.registry)
    assert ("podnet_bgp_process_cpu_seconds_total", (("process", "exabgp"),)) not in s  # gone


def test_a_section_that_raises_is_left_out_and_the_scrape_goes_on(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    node.speaker.broken = True
    text, s = scrape(node.registry)
    assert not [key for key in s if key[0].startswith(("podnet_bgp_peers", "podnet_bgp_prefixes_"))]
    assert value(s, "podnet_datastore_in_sync") == 0  # the other sections are all there
    assert "podnet_policy_sync_duration_seconds" in text
    promtool_check(text)
    scrape(node.registry)
    assert len([r for r in caplog.records if "bgp left out of the scrape" in r.getMessage()]) == 1  # logged once
    node.speaker.broken = False
    _, s = scrape(node.registry)
    assert value(s, "podnet_bgp_peers", state="Idle") == 0


def test_datastore_counters_revision_and_local_endpoints(node: Node) -> None:
    for i, node_name in enumerate((NODE, NODE, "node-2"), start=1):
        key = k.EndpointKey(node_name, "default", f"pod-{i}", "eth0")
        ep = m.Endpoint(node_name, "default", f"pod-{i}", "eth0", f"cali{i}", (f"10.244.1.{i}/32",))
        node.cache.apply(k.ENDPOINTS_PREFIX, Updated(key, key.path, ep, 40 + i))
    watch = Watcher(None, k.ENDPOINTS_PREFIX, lambda _u: None)  # type: ignore[arg-type]  # never started
    watch.snapshots, watch.reconnects, watch.stalls, watch.errors = 2, 3, 1, 0
    node.cache.watchers.append(watch)
    _, s = scrape(node.registry)
    assert value(s, "podnet_datastore_in_sync") == 0
    assert value(s, "podnet_local_endpoints") == 2
    assert value(s, "podnet_datastore_revision") == 43
    assert value(s, "podnet_datastore_snapshots_total") == 2
    assert value(s, "podnet_datastore_reconnects_total") == 3
    assert value(s, "podnet_datastore_watch_stalls_total") == 1
    assert value(s, "podnet_datastore_errors_total") == 0
    for prefix in WATCHED:
        node.cache.apply(prefix, InSync(50))
    _, s = scrape(node.registry)
    assert value(s, "podnet_datastore_in_sync") == 1
    assert value(s, "podnet_datastore_revision") == 50


def test_active_and_rejected_policies(node: Node) -> None:
    node.feed.statuses = {
        ("ns", "ok"): PolicyStatus("ns", "ok", True),
        ("ns", "ok2"): PolicyStatus("ns", "ok2", True),
        ("ns", "bad"): PolicyStatus("ns", "bad", False, "port: not a number"),
        ("ns", "p"): PolicyStatus("ns", "p", False, "refused by the kernel: no such match"),
    }
    node.syncer.refusals = {"ns/p": object()}  # type: ignore[dict-item]
    _, s = scrape(node.registry)
    assert value(s, "podnet_policies_active") == 2
    assert value(s, "podnet_policies_rejected", cause="invalid") == 1
    assert value(s, "podnet_policies_rejected", cause="kernel") == 1


def test_everything_passes_promtool_and_the_parser(node: Node) -> None:
    node.syncer.sync_once()
    node.routes.apply({"10.244.2.0/26": Route("10.244.2.0/26", "remote-block", via="192.168.77.2")}, in_sync=False)
    node.speaker.peers = [PeerState("192.168.77.2", "node", "node-2", "Established", "", "", 64512, 3, 1)]
    text, samples = scrape(node.registry)
    promtool_check(text)
    names = {name for name, _ in samples}
    for expected in (
        "podnet_policy_sync_duration_seconds_bucket",
        "podnet_route_apply_duration_seconds_bucket",
        "podnet_link_apply_duration_seconds_bucket",
        "podnet_dataplane_command_total",
        "podnet_dataplane_command_errors_total",
        "podnet_policy_sync_errors_total",
        "podnet_policy_owned_chains",
        "podnet_policy_owned_rules",
        "podnet_policy_owned_ipsets",
        "podnet_policy_ipset_members",
        "podnet_local_endpoints",
        "podnet_policies_active",
        "podnet_policies_rejected",
        "podnet_bgp_peers",
        "podnet_bgp_prefixes_received",
        "podnet_bgp_prefixes_sent",
        "podnet_routes_programmed",
        "podnet_datastore_reconnects_total",
        "podnet_datastore_snapshots_total",
        "podnet_datastore_watch_stalls_total",
        "podnet_datastore_revision",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ):
        assert expected in names, expected


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    h = Histogram((0.01, 0.1, 1.0))
    for v in (0.005, 0.01, 0.05, 2.0):
        h.observe(v)
    snap = h.snapshot()
    assert snap.cumulative == (2, 3, 3, 4)  # 0.01 falls in le="0.01", as Prometheus counts
    assert snap.count == 4 and snap.sum == pytest.approx(2.065)
    with pytest.raises(ValueError):
        Histogram((1.0, 0.5))


def test_an_object_made_when_its_component_starts_is_followed() -> None:
    made: list[PolicySyncer | None] = [None]
    registry = CollectorRegistry()
    register_node_metrics(registry, policy_of=lambda: made[0])
    text, _ = scrape(registry)
    assert "podnet_policy" not in text  # not started: absent, the scrape fine
    syncer = made[0] = PolicySyncer(PolicyDataplane(FakeTools(), Backend("nft")), Source().desired)
    syncer.sync_once()
    _, s = scrape(registry)
    assert value(s, "podnet_policy_sync_duration_seconds_count", kind="full") == 1


def _the_agents_wiring_fits(agent: NodeAgent) -> None:
    """Not run: mypy checks that the daemon's objects fit the collectors' protocols (the tests pass fakes for the
    speaker and the policy verdicts), as ``daemon/node.py`` would wire them."""
    policy, router = agent.policy, agent.router
    register_node_metrics(
        agent.registry,
        node=agent.config.node_name,
        cache_of=lambda: agent.datastore.cache,
        policy_of=(lambda: policy.syncer) if policy else None,
        verdicts_of=(lambda: policy.feed) if policy else None,
        commands_of=(lambda: policy.syncer.dataplane.runner.stats if policy.syncer else None) if policy else None,
        routes_of=(lambda: router.runner.routes) if router else None,
        links_of=(lambda: router.runner.links) if router else None,
        speaker_of=(lambda: router.runner.speaker) if router else None,
    )


@pytest.mark.parametrize("remote", [False, True], ids=["in-process", "child-process"])
def test_cni_calls_timed_and_counted_by_command(remote: bool) -> None:
    """In the agent's process, or reported by the CNI server's child process (its JSON stats answer)."""
    import json

    from cni.stats import CniStats, StatsCopy

    stats = CniStats()
    registry = new_registry()
    register_node_metrics(
        registry, cni_of=lambda: StatsCopy(json.loads(json.dumps(stats.to_json()))) if remote else stats
    )
    stats.record("ADD", 0.02, ok=True)
    stats.record("ADD", 0.3, ok=False)
    stats.record("DEL", 0.004, ok=True)
    stats.record("bogus", 0.001, ok=False)
    text, samples = scrape(registry)
    promtool_check(text)
    assert value(samples, "podnet_cni_request_duration_seconds_count", command="ADD") == 2
    assert value(samples, "podnet_cni_request_duration_seconds_bucket", command="ADD", le="0.025") == 1
    assert value(samples, "podnet_cni_request_duration_seconds_count", command="DEL") == 1
    assert value(samples, "podnet_cni_requests_total", command="ADD") == 2
    assert value(samples, "podnet_cni_errors_total", command="ADD") == 1
    assert value(samples, "podnet_cni_errors_total", command="INVALID") == 1


def test_a_stats_answer_that_is_not_one_is_refused() -> None:
    from cni.stats import StatsCopy

    for bad in ([], {"latency": {}}, {"latency": {"ADD": {"bounds": "x"}}, "requests": {}, "errors": {}}):
        with pytest.raises(ValueError, match="not CNI server stats"):
            StatsCopy(bad)
