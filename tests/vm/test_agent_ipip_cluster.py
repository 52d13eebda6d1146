"""Three nodes in the guest run the agent's code paths end to end over IPIP: IPAM in a real etcd, the agent's
cache, real ExaBGP speakers exchanging the nodes' blocks, the route and device writers, the policy compiler and its
iptables/ipset writers. Pods on different nodes talk TCP through tunl0; crossSubnet keeps same-subnet traffic off
the tunnel; NetworkPolicy holds for traffic that arrives over tunl0, matching the remote pod's own address.

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

from bgp.plan import identity, plan_announcements, plan_peers
from bgp.speaker import Speaker, SpeakerConfig
from datastore import keys as k
from datastore import model as m
from datastore.etcd import EtcdClient
from datastore.store import Store
from ipam.allocator import Ipam
from ipam.pools import add_pool
from testbed.etcd_server import EtcdServer
from testbed.netns import NetnsBed, Node, Pod, Underlay
from testbed.wait import eventually
from tests.conftest import SESSION_ID
from tests.vm.agent_steps import podnet_routes, program_policy, program_routes, snapshot, tunl0_packets

pytestmark = pytest.mark.needs_ipip

POOL_IPIP = "10.244.0.0/18"  # encapsulation ipip: always through tunl0
POOL_CROSS = "10.244.64.0/18"  # encapsulation ipip, crossSubnet: tunl0 only to nodes on another subnet
NS = "prod"
PORT = 8080
BGP_TIMEOUT = 240.0  # three ExaBGP processes start and peer in ~40 s under emulation; leave room on a busy machine


@dataclass
class Cluster:
    client: EtcdClient
    nodes: dict[str, Node]
    pods: dict[str, Pod]  # a<i>: pod on n<i> from POOL_IPIP; x<i>: pod on n<i> from POOL_CROSS
    speakers: dict[str, Speaker]

    def converge(self) -> None:
        """One agent pass on every node: snapshot, routes from the BGP RIB, devices, policy."""
        snap = snapshot(self.client)
        for name, node in self.nodes.items():
            program_routes(snap, node, self.speakers[name].best_routes().values())
            program_policy(snap, node)

    def block_of(self, pod: str) -> str:
        ip = ipaddress.ip_address(self.pods[pod].ip)
        return next(b for b in snapshot_blocks(self.client) if ip in ipaddress.ip_network(b))

    def reach(self, src: str, dst: str, timeout: float = 2.0) -> bool:
        return self.pods[src].ns.connect("tcp", self.pods[dst].ip, PORT, timeout=timeout)


def snapshot_blocks(client: EtcdClient) -> list[str]:
    return [v.value.cidr for v in Store(client).list(k.BLOCKS_PREFIX, m.Block)]


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
    speakers: dict[str, Speaker] = {}
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
        pods: dict[str, Pod] = {}
        for name, node in nodes.items():
            store.put(m.Node(name, node.ip))
            ipam.ensure_tunnel_address(name, "ipip")
            i = name[1:]
            for pod, pool in ((f"a{i}", POOL_IPIP), (f"x{i}", POOL_CROSS)):
                ip = ipam.auto_assign(f"{NS}.{pod}", name, pod=f"{NS}/{pod}", pool=pool)
                pods[pod] = bed.pod(node, NS, pod, ip)
                store.put(m.Pod(NS, pod, {"app": pod}, (ip,), name))
                store.put(m.Endpoint(name, NS, pod, "eth0", pods[pod].host_iface, ips=(f"{ip}/32",)))
                pods[pod].ns.listen("tcp", PORT)

        snap = snapshot(client)
        announced = {}
        for name, node in nodes.items():
            sp = Speaker(
                SpeakerConfig(identity(snap.nodes[name], snap.config), backoff_initial=0.2),
                workdir / name,
                netns=node.ns.name,
            )
            speakers[name] = sp
            sp.start()
            sp.set_peers(plan_peers(name, snap.nodes, snap.config, snap.bgp_peers.values()))
            announced[name] = plan_announcements(
                name, snap.blocks, snap.affinities, snap.endpoints.values(), snap.nodes
            )
            sp.announce(announced[name])

        def learned_everything() -> bool:
            for name, sp in speakers.items():
                want = {p: nodes[o].address for o, prefixes in announced.items() if o != name for p in prefixes}
                if {p: r.next_hop for p, r in sp.best_routes().items()} != want:
                    return False
            return True

        assert eventually(learned_everything, timeout=BGP_TIMEOUT, interval=0.5), (
            "the speakers did not learn each other's blocks: "
            + "; ".join(f"{n}: {[(p.address, p.state, p.info) for p in s.peer_status()]}" for n, s in speakers.items())
        )
        cl = Cluster(client, nodes, pods, speakers)
        cl.converge()
        yield cl
    finally:
        for sp in speakers.values():
            sp.stop()
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
        cluster.converge()
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
        cluster.converge()
    assert cluster.reach("a2", "a3")
