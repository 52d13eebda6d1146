"""The node runner's own logic, in-process, against real etcd and a real node namespace, with the BGP speaker
replaced by a scripted one (so BGP's timing is under the test's control): what it does after a restart before BGP
is back, how withdrawals and lost notifications are handled, and that a missing node record leaves the kernel alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from agent.router.config import RouterConfig
from agent.router.loop import Router
from bgp.plan import PeerSpec, SpeakerIdentity
from bgp.rib import LearnedRoute
from bgp.speaker import PeerState, Speaker
from datastore import keys as k
from datastore import model as m
from datastore.etcd import EtcdClient
from datastore.store import Store
from testbed.netns import NetnsBed, NodeNs
from testbed.wait import eventually

pytestmark = pytest.mark.netns

PEER = "192.168.77.12"
REMOTE = "10.244.2.0/26"


class ScriptedSpeaker:
    """Stands in for bgp.speaker.Speaker: the test sets the peer state and the RIB."""

    def __init__(self, identity: SpeakerIdentity) -> None:
        self.identity = identity
        self.state = "Active"
        self.routes: dict[str, LearnedRoute] = {}
        self.callbacks: list[Callable[[], None]] = []
        self.announced: frozenset[str] = frozenset()
        self.stopped: bool | None = None

    def on_change(self, callback: Callable[[], None]) -> None:
        self.callbacks.append(callback)

    def start(self) -> None:
        pass

    def stop(self, withdraw: bool = True) -> None:
        self.stopped = withdraw

    def set_peers(self, peers: Iterable[PeerSpec]) -> None:
        pass

    def announce(self, prefixes: Iterable[str], handoff: float = 0.0) -> None:
        self.announced = frozenset(prefixes)

    def best_routes(self) -> dict[str, LearnedRoute]:
        return dict(self.routes)

    def peer_status(self) -> list[PeerState]:
        return [PeerState(PEER, "node-to-node mesh", "n2", self.state, "", "", 64512, len(self.routes))]

    def notify(self) -> None:
        for cb in self.callbacks:
            cb()


class ScriptedRouter(Router):
    def _make_speaker(self, ident: SpeakerIdentity) -> Speaker:
        self.scripted = ScriptedSpeaker(ident)
        return cast(Speaker, self.scripted)


def podnet_routes(node: NodeNs) -> list[str]:
    return [line.strip() for line in node.ns.ip("route", "show", "proto", "80").splitlines()]


@pytest.fixture
def node(netns_bed: NetnsBed) -> NodeNs:
    ul = netns_bed.underlay()
    return netns_bed.node("n1", ul, 11)


@pytest.fixture
def runner_factory(etcd: EtcdClient, tmp_path: Path) -> Iterator[Callable[..., ScriptedRouter]]:
    made: list[ScriptedRouter] = []

    def make(node: NodeNs, **config: Any) -> ScriptedRouter:
        cfg = RouterConfig(node="n1", workdir=tmp_path, netns=node.ns.name, **{"resync": 0.5, **config})
        r = ScriptedRouter(etcd, cfg)
        made.append(r)
        r.start()
        return r

    try:
        yield make
    finally:
        for r in made:
            r.stop()


def write_world(etcd: EtcdClient, node: NodeNs) -> None:
    store = Store(etcd)
    store.put(m.IPPool("10.244.0.0/16", encapsulation="none"))
    store.put(m.Node("n1", node.ip))
    store.put(m.Node("n2", f"{PEER}/24"))
    store.put(m.Block("10.244.1.0/26", affinity="node:n1"))
    store.put(m.Block(REMOTE, affinity="node:n2"))


def test_after_a_restart_learned_routes_wait_for_bgp_and_withdrawals_apply_at_once(
    etcd: EtcdClient, node: NodeNs, runner_factory: Callable[..., ScriptedRouter]
) -> None:
    write_world(etcd, node)
    # Left by the previous run: a learned route and a blackhole for a block we no longer have.
    node.ns.ip("route", "add", REMOTE, "via", PEER, "proto", "80")
    node.ns.ip("route", "add", "blackhole", "10.244.9.0/26", "proto", "80")
    r = runner_factory(node, settle=0.5, startup_grace=60, resync=30)  # only events (and the RIB poll) drive it

    assert eventually(lambda: "blackhole 10.244.1.0/26" in podnet_routes(node), 10)
    assert eventually(lambda: "blackhole 10.244.9.0/26" not in podnet_routes(node), 5)  # datastore says: stale
    assert r.scripted.announced == frozenset({"10.244.1.0/26"})
    # BGP is not back (peer Active, empty RIB): the learned route stays.
    assert not eventually(lambda: f"{REMOTE} via {PEER} dev eth0" not in podnet_routes(node), 1.5)

    # The peer comes back and re-sends the route: adopted as is. Then it withdraws it: gone at once.
    r.scripted.state = "Established"
    r.scripted.routes = {REMOTE: LearnedRoute(REMOTE, PEER, PEER)}
    r.scripted.notify()
    assert eventually(lambda: r.last_plan is not None and REMOTE in r.last_plan.routes, 5)
    r.scripted.routes = {}
    r.scripted.notify()
    assert eventually(lambda: f"{REMOTE} via {PEER} dev eth0" not in podnet_routes(node), 2)

    # A change the speaker forgot to announce is still picked up (the runner polls the RIB).
    assert eventually(lambda: r.bgp_in_sync, 3)
    passes = r.passes
    time.sleep(0.3)
    assert r.passes == passes  # idle: nothing else will make it look
    r.scripted.routes = {REMOTE: LearnedRoute(REMOTE, PEER, PEER)}
    assert eventually(lambda: f"{REMOTE} via {PEER} dev eth0" in podnet_routes(node), 2)

    # Status for operators, under the runner's lease.
    store = Store(etcd)
    assert eventually(lambda: store.get(k.RouteKey("n1", REMOTE), m.RouteStatus) is not None, 5)
    st = store.get(k.RouteKey("n1", REMOTE), m.RouteStatus)
    assert st is not None and (st.value.via, st.value.dev, st.value.learned_from) == (PEER, "eth0", PEER)
    agent = store.get(k.AgentStatusKey("n1"), m.AgentStatus)
    assert agent is not None and agent.value.in_sync and agent.value.router_id == "192.168.77.11"


def test_a_peer_that_stays_down_is_given_up_after_the_startup_grace(
    etcd: EtcdClient, node: NodeNs, runner_factory: Callable[..., ScriptedRouter]
) -> None:
    write_world(etcd, node)
    node.ns.ip("route", "add", REMOTE, "via", PEER, "proto", "80")
    runner_factory(node, settle=0.5, startup_grace=2.0)
    assert eventually(lambda: "blackhole 10.244.1.0/26" in podnet_routes(node), 10)
    assert f"{REMOTE} via {PEER} dev eth0" in podnet_routes(node)
    assert eventually(lambda: f"{REMOTE} via {PEER} dev eth0" not in podnet_routes(node), 5)


def test_without_its_node_record_the_runner_leaves_the_kernel_alone(
    etcd: EtcdClient, node: NodeNs, runner_factory: Callable[..., ScriptedRouter]
) -> None:
    write_world(etcd, node)
    Store(etcd).delete(k.NodeKey("n1"))
    node.ns.ip("route", "add", "blackhole", "10.244.9.0/26", "proto", "80")
    runner_factory(node)
    store = Store(etcd)

    def reported() -> bool:
        agent = store.get(k.AgentStatusKey("n1"), m.AgentStatus)
        return agent is not None and any("no node record" in p for p in agent.value.problems)

    assert eventually(reported, 10)
    assert podnet_routes(node) == ["blackhole 10.244.9.0/26"]


def test_peer_state_is_published_at_once_prefix_counts_at_the_resync(
    etcd: EtcdClient, node: NodeNs, runner_factory: Callable[..., ScriptedRouter]
) -> None:
    """Prefix counts change with every route anywhere; written at each change they would cost an etcd write per
    peer on every node per event. State changes go out at once."""
    write_world(etcd, node)
    store = Store(etcd)

    def peer() -> m.BGPPeerStatus | None:
        found = [v.value for v in store.list(k.bgp_status_prefix("n1"), m.BGPPeerStatus)]
        return found[0] if found else None

    started = time.monotonic()
    r = runner_factory(node, settle=0.5, startup_grace=60, resync=4)
    assert eventually(lambda: (p := peer()) is not None and p.state == "Active", 5)
    r.scripted.state = "Established"
    r.scripted.notify()
    assert eventually(lambda: (p := peer()) is not None and p.state == "Established", 2)

    r.scripted.routes = {REMOTE: LearnedRoute(REMOTE, PEER, PEER)}
    r.scripted.notify()
    assert eventually(lambda: f"{REMOTE} via {PEER} dev eth0" in podnet_routes(node), 3)
    current = peer()
    assert current is not None
    if time.monotonic() - started < 3.3:  # the first verifying pass after the start (3.6-4.4 s) has not come yet
        assert current.prefixes_received == 0, "a count-only change was written at once"
    assert eventually(lambda: (p := peer()) is not None and p.prefixes_received == 1, 10)


def test_prefixes_churning_after_bgp_is_in_sync_leave_the_kernel_and_no_trace_in_the_runner(
    etcd: EtcdClient, node: NodeNs, runner_factory: Callable[..., ScriptedRouter]
) -> None:
    """Borrowed /32s come and go with pods. Before BGP is in sync the runner must remember what BGP delivered (a
    withdrawal of it is real even then); once BGP is in sync every learned route missing from the RIB goes anyway,
    so that memory is dropped instead of growing with every /32 ever learned and being diffed on every pass."""
    write_world(etcd, node)
    r = runner_factory(node, settle=0.3, startup_grace=60, resync=30)
    assert eventually(lambda: "blackhole 10.244.1.0/26" in podnet_routes(node), 10)
    r.scripted.state = "Established"
    r.scripted.notify()
    assert eventually(lambda: r.bgp_in_sync, 5)
    for batch in range(5):
        prefixes = [f"10.244.{50 + batch}.{i}/32" for i in range(1, 41)]
        r.scripted.routes = {p: LearnedRoute(p, PEER, PEER) for p in prefixes}
        r.scripted.notify()
        want = {f"{p.removesuffix('/32')} via {PEER} dev eth0" for p in prefixes}
        assert eventually(lambda want=want: want <= set(podnet_routes(node)), 5), batch
        r.scripted.routes = {}
        r.scripted.notify()
        assert eventually(lambda: not any(" via " in line for line in podnet_routes(node)), 5), batch
    assert r.bgp_latch.seen == set()  # was every prefix of the run (200 here)


def test_a_change_routes_do_not_depend_on_costs_no_planning_yet_a_local_endpoint_is_routed(
    etcd: EtcdClient, node: NodeNs, runner_factory: Callable[..., ScriptedRouter]
) -> None:
    """In podnet-agent the router shares the process with the policy compiler: a policy, a pod's labels, a
    namespace or another node's endpoint must not make it plan every route again. Its applied revision still
    follows (the lab waits on it)."""
    write_world(etcd, node)
    r = runner_factory(node, settle=0.2, startup_grace=60, resync=30)
    assert eventually(lambda: getattr(r, "scripted", None) is not None, timeout=10)
    r.scripted.state = "Established"
    r.scripted.notify()
    assert eventually(lambda: r.bgp_latch.in_sync and r.last_plan is not None, timeout=15)
    store = Store(etcd)
    plan_before, skipped = r.last_plan, r.skipped
    for i in range(5):
        store.put(m.Policy("ns", f"p{i}", {"podSelector": {}, "policyTypes": ["Ingress"]}))
        store.put(m.Pod("ns", f"pod{i}", {"i": str(i)}, (f"10.244.2.{i + 5}",), "n2"))
        store.put(m.Endpoint("n2", "ns", f"pod{i}", "eth0", f"cali{i}", (f"10.244.2.{i + 5}/32",)))
    store.put(m.Namespace("ns", {"team": "a"}))
    last = etcd.get_prefix("/podnet/v1/")[1]
    assert eventually(lambda: r.applied_revision is not None and r.applied_revision >= last, timeout=10)
    assert r.skipped > skipped, "every pass planned routes again"
    assert r.last_plan is plan_before
    # A pod on this node is routed at once.
    pod_ip = "10.244.1.7"
    node.ns.ip("link", "add", "cali-local", "type", "veth", "peer", "name", "cali-peer")
    node.ns.ip("link", "set", "cali-local", "up")
    store.put(m.Endpoint("n1", "ns", "mine", "eth0", "cali-local", (f"{pod_ip}/32",)))
    assert eventually(lambda: any(line.startswith(pod_ip) for line in podnet_routes(node)), timeout=10), podnet_routes(
        node
    )
