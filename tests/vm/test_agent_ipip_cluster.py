"""Three nodes in the guest run the agent end to end over IPIP: IPAM in a real etcd, and on each node the agent's
node runner (its cache, a real ExaBGP speaker exchanging the nodes' blocks, route calculation, the tunl0 and route
writers, status in etcd), plus the policy compiler and its iptables/ipset writers. Pods on different nodes talk TCP
through tunl0; crossSubnet keeps same-subnet traffic off the tunnel; NetworkPolicy holds for traffic that arrives
over tunl0, matching the remote pod's own address; the runner repairs a tunl0 someone broke.

Topology: one L2 segment carrying two subnets (192.168.77.0/25: n1, n2; 192.168.77.128/25: n3) joined by a router
(the underlay namespace). Two IPIP pools: one always encapsulates, one (crossSubnet) only between subnets.
One cluster for the whole module: bringing up three ExaBGP sessions under emulation takes ~40 s.
"""

from __future__ import annotations

import ipaddress
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.router.config import RouterConfig
from agent.router.loop import Router
from bgp import speaker
from datastore import keys as k
from datastore import model as m
from datastore.etcd import EtcdClient
from datastore.store import Store
from ipam.allocator import Ipam
from ipam.pools import add_pool
from testbed.etcd_server import EtcdServer
from testbed.netns import NetnsBed, NodeNs, Pod, Underlay
from testbed.wait import eventually
from tests.conftest import SESSION_ID
from tests.vm.agent_steps import podnet_routes, program_policy, snapshot, tunl0, tunl0_packets

# The module's cluster is set up inside its first test's time limit (the project's 300 s would be tight on a busy
# machine); the VM runner's own limit still bounds the whole tier.
pytestmark = [pytest.mark.needs_ipip, pytest.mark.timeout(480)]

POOL_IPIP = "10.244.0.0/18"  # encapsulation ipip: always through tunl0
POOL_CROSS = "10.244.64.0/18"  # encapsulation ipip, crossSubnet: tunl0 only to nodes on another subnet
NS = "prod"
PORT = 8080
BGP_TIMEOUT = 240.0  # three ExaBGP processes start and peer in ~40 s under emulation; leave room on a busy machine
RESYNC = 5.0  # the runners' repair pass (each pass reads the kernel and writes status: not free under emulation)
# The speaker restarts an ExaBGP whose API bridge has not connected within 15 s; three ExaBGPs starting at once under
# emulation need longer than that, and would be restarted forever.
EMULATED_BRIDGE_TIMEOUT = 180.0


@dataclass
class Cluster:
    client: EtcdClient
    nodes: dict[str, NodeNs]
    pods: dict[str, Pod]  # a<i>: pod on n<i> from POOL_IPIP; x<i>: pod on n<i> from POOL_CROSS
    runners: dict[str, Router]

    def program_policy(self) -> None:
        """The policy half of an agent pass on every node (the node runner does routes and devices)."""
        snap = snapshot(self.client)
        for node in self.nodes.values():
            program_policy(snap, node)

    def block_of(self, pod: str) -> str:
        ip = ipaddress.ip_address(self.pods[pod].ip)
        return next(b for b in blocks(self.client) if ip in ipaddress.ip_network(b))

    def reach(self, src: str, dst: str, timeout: float = 2.0) -> bool:
        return self.pods[src].ns.connect("tcp", self.pods[dst].ip, PORT, timeout=timeout)


def blocks(client: EtcdClient) -> dict[str, str | None]:
    """Every IPAM block and the node it is affine to."""
    return {v.value.cidr: v.value.affine_node for v in Store(client).list(k.BLOCKS_PREFIX, m.Block)}


def two_subnet_underlay(bed: NetnsBed) -> tuple[Underlay, Underlay]:
    """Two subnets on one bridge; the bridge's namespace routes between them (the nodes' default gateway)."""
    a = bed.underlay(subnet="192.168.77.0/25")
    a.ns.ip("addr", "add", "192.168.77.129/25", "dev", a.bridge)
    a.ns.sysctl("net.ipv4.ip_forward", "1")
    a.ns.sysctl("net.ipv4.conf.all.send_redirects", "0")
    a.ns.sysctl(f"net.ipv4.conf.{a.bridge}.send_redirects", "0")
    return a, Underlay(a.ns, ipaddress.IPv4Network("192.168.77.128/25"), a.bridge)


@pytest.fixture(scope="module")
def cluster(etcd_server: EtcdServer) -> Iterator[Cluster]:
    client = EtcdClient([etcd_server.endpoint])
    client.delete_prefix("/")
    bed = NetnsBed(run_id=f"{SESSION_ID}vm")
    workdir = Path(tempfile.mkdtemp(prefix="podnet-vm-bgp-"))
    runners: dict[str, Router] = {}
    patch = pytest.MonkeyPatch()
    patch.setattr(speaker, "BRIDGE_TIMEOUT", EMULATED_BRIDGE_TIMEOUT)
    try:
        store = Store(client)
        add_pool(store, m.IPPool(POOL_IPIP, encapsulation="ipip"))
        add_pool(store, m.IPPool(POOL_CROSS, encapsulation="ipip", cross_subnet=True))
        store.put(m.Namespace(NS))
        sub_a, sub_b = two_subnet_underlay(bed)
        nodes = {
            "n1": bed.node("n1", sub_a, 11),
            "n2": bed.node("n2", sub_a, 12),
            "n3": bed.node("n3", sub_b, 13),
        }
        ipam = Ipam(client)
        for name, node in nodes.items():
            store.put(m.Node(name, node.ip))
            ipam.ensure_tunnel_address(name, "ipip")
        # The agents first: their ExaBGPs start (slow under emulation) while the pods are wired, and each new block
        # and pod reaches them as a datastore change, as in a live cluster.
        for name, node in nodes.items():
            config = RouterConfig(node=name, workdir=workdir / name, netns=node.ns.name, resync=RESYNC)
            runners[name] = Router(client, config).start()
        pods: dict[str, Pod] = {}
        for name, node in nodes.items():
            i = name[1:]
            for pod, pool in ((f"a{i}", POOL_IPIP), (f"x{i}", POOL_CROSS)):
                ip = ipam.auto_assign(f"{NS}.{pod}", name, pod=f"{NS}/{pod}", pool=pool)
                pods[pod] = bed.pod(node, NS, pod, ip)
                store.put(m.Pod(NS, pod, {"app": pod}, (ip,), name))
                store.put(m.Endpoint(name, NS, pod, "eth0", pods[pod].host_iface, ips=(f"{ip}/32",)))
                pods[pod].ns.listen("tcp", PORT)

        def routed_everywhere() -> bool:
            """Every node has a podnet route to every block affine to another node."""
            owned = blocks(client)
            for name, node in nodes.items():
                routes = " ".join(podnet_routes(node))
                if any(f"{cidr} via " not in routes for cidr, owner in owned.items() if owner != name):
                    return False
            return True

        assert eventually(routed_everywhere, timeout=BGP_TIMEOUT, interval=0.5), "; ".join(
            f"{n}: peers {[(p.address, p.state, p.info) for p in r.speaker.peer_status()] if r.speaker else None}"
            f" routes {podnet_routes(nodes[n])}"
            for n, r in runners.items()
        )
        cl = Cluster(client, nodes, pods, runners)
        cl.program_policy()
        yield cl
    finally:
        for runner in runners.values():
            runner.stop()
        patch.undo()
        shutil.rmtree(workdir, ignore_errors=True)
        bed.close()
        client.close()


def test_bgp_learned_routes_go_via_tunl0_onlink_and_carry_tcp(cluster: Cluster) -> None:
    n1, n2, n3 = (cluster.nodes[n] for n in ("n1", "n2", "n3"))
    routes = podnet_routes(n1)
    assert f"{cluster.block_of('a2')} via {n2.address} dev tunl0 onlink" in routes, routes
    assert f"{cluster.block_of('a3')} via {n3.address} dev tunl0 onlink" in routes, routes

    for src, dst in (("a1", "a2"), ("a2", "a3"), ("a3", "a1")):
        s, d = cluster.pods[src].node, cluster.pods[dst].node
        s_before, d_before = tunl0_packets(s), tunl0_packets(d)
        assert cluster.reach(src, dst), f"{src} -> {dst}"
        s_after, d_after = tunl0_packets(s), tunl0_packets(d)
        assert s_after[1] > s_before[1], f"{src} -> {dst}: nothing left {s.name} through tunl0"
        assert d_after[0] > d_before[0], f"{src} -> {dst}: nothing arrived at {d.name} through tunl0"


def test_cross_subnet_routes_directly_inside_a_subnet_and_through_tunl0_across(cluster: Cluster) -> None:
    n1, n2, n3 = (cluster.nodes[n] for n in ("n1", "n2", "n3"))
    routes = podnet_routes(n1)
    assert f"{cluster.block_of('x2')} via {n2.address} dev eth0" in routes, routes
    assert f"{cluster.block_of('x3')} via {n3.address} dev tunl0 onlink" in routes, routes
    routes3 = podnet_routes(n3)
    assert f"{cluster.block_of('x1')} via {n1.address} dev tunl0 onlink" in routes3, routes3

    before1, before2 = tunl0_packets(n1), tunl0_packets(n2)
    assert cluster.reach("x1", "x2")
    assert tunl0_packets(n1) == before1 and tunl0_packets(n2) == before2  # same subnet: not encapsulated

    before1, before3 = tunl0_packets(n1), tunl0_packets(n3)
    assert cluster.reach("x1", "x3")
    assert tunl0_packets(n1)[1] > before1[1] and tunl0_packets(n3)[0] > before3[0]


def test_network_policy_holds_for_traffic_arriving_over_tunl0(cluster: Cluster) -> None:
    store = Store(cluster.client)
    policy = m.Policy(
        NS,
        "a3-from-a1",
        {
            "podSelector": {"matchLabels": {"app": "a3"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "a1"}}}], "ports": [{"port": PORT}]}],
        },
    )
    assert cluster.reach("a2", "a3") and cluster.reach("x2", "a3")  # open before the policy
    store.put(policy)
    try:
        cluster.program_policy()
        n3 = cluster.nodes["n3"]
        before = tunl0_packets(n3)
        assert cluster.reach("a1", "a3")  # allowed by label, from another node, over tunl0
        assert tunl0_packets(n3)[0] > before[0]
        assert not cluster.reach("a2", "a3", timeout=1.0)  # isolated from a remote pod the policy does not name
        assert not cluster.reach("x2", "a3", timeout=1.0)
        assert cluster.reach("a2", "x3")  # a pod no policy selects stays open
        # What n3's filter saw: the remote pod's own address as the source, not a tunnel endpoint's.
        a1, a3 = cluster.pods["a1"], cluster.pods["a3"]
        seen = n3.ns.run("conntrack", "-L", "-p", "tcp", "--orig-dst", a3.ip, "--dport", str(PORT)).stdout
        assert f"src={a1.ip} dst={a3.ip}" in seen, seen
    finally:
        store.delete(k.PolicyKey(NS, "a3-from-a1"))
        cluster.program_policy()
    assert cluster.reach("a2", "a3")


def test_the_runner_repairs_a_broken_tunl0_and_publishes_ipip_routes(cluster: Cluster) -> None:
    n1, n3 = cluster.nodes["n1"], cluster.nodes["n3"]
    block = cluster.block_of("a3")
    status = Store(cluster.client).get(k.RouteKey("n1", block), m.RouteStatus)
    assert status is not None
    assert (status.value.via, status.value.dev, status.value.encapsulation) == (n3.address, "tunl0", "ipip")

    # Down (the kernel drops every route through it) and a wrong MTU: the runner's next pass puts both back.
    n1.ns.ip("link", "set", "tunl0", "down", "mtu", "1200")

    def repaired() -> bool:
        link = tunl0(n1)
        return link["mtu"] == 1500 - 20 and "UP" in link["flags"]  # type: ignore[operator]

    assert eventually(repaired, RESYNC * 12)
    assert eventually(lambda: f"{block} via {n3.address} dev tunl0 onlink" in podnet_routes(n1), RESYNC * 12)
    assert cluster.reach("a1", "a3")
