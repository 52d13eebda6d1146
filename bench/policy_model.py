"""Synthetic clusters for the policy benchmarks, shaped as a real cluster's datastore holds them: every pod lives on
a node (``per_node`` pods each, the measured node first), has an endpoint on that node and an address from one of
that node's IPAM blocks; node records, the pool, the blocks (with the node's VXLAN tunnel address) and their
affinities exist; pods, endpoints and blocks carry what the controller and the CNI write (node, IPs, handle, MAC,
container ID). So the agent's cache holds what it would hold on a node of such a cluster, not only the local node's
part. Deterministic (seeded).

Until 2026-12 the model put endpoints only on the measured node ("old model" in bench/results/): it hid every
per-change cost that grows with the cluster's endpoints."""

from __future__ import annotations

import hashlib
import ipaddress
import random
from dataclasses import dataclass, field

from cni.link import pod_mac
from datastore import codec
from datastore import model as m
from ipam.allocator import pod_handle, tunnel_handle

POOL = m.IPPool("10.244.0.0/16", block_size=26, encapsulation="vxlan")
POD_NET = ipaddress.IPv4Network(POOL.cidr)
BLOCK = 1 << (32 - POOL.block_size)
RESERVED_BLOCKS = 4  # 10.244.0.0/24 is left for the real pods of a benchmark
APPS = ("web", "api", "db", "cache", "queue", "auth", "search", "batch")


def pod_ip(i: int) -> str:
    """An address for synthetic pod ``i`` outside 10.244.0.0/24 (for benchmarks that make their own pods)."""
    return str(POD_NET.network_address + 256 + (i // 250) * 256 + 2 + i % 250)


def iface(ns: str, pod: str) -> str:
    """The host-side veth name the CNI gives a pod."""
    return "cali" + hashlib.sha1(f"{ns}.{pod}".encode()).hexdigest()[:11]


def container_id(ns: str, pod: str) -> str:
    return hashlib.sha256(f"sandbox/{ns}/{pod}".encode()).hexdigest()


def node_name(j: int, node: str) -> str:
    return node if j == 0 else f"node{j}"


@dataclass
class Cluster:
    pods: list[m.Pod] = field(default_factory=list)
    namespaces: list[m.Namespace] = field(default_factory=list)
    policies: list[m.Policy] = field(default_factory=list)
    endpoints: list[m.Endpoint] = field(default_factory=list)
    nodes: list[m.Node] = field(default_factory=list)
    pools: list[m.IPPool] = field(default_factory=list)
    blocks: list[m.Block] = field(default_factory=list)
    affinities: list[m.Affinity] = field(default_factory=list)

    def objects(self) -> list[codec.Model]:
        """Everything, in the order a cluster's datastore would get it (IPAM, nodes, then workloads, policy)."""
        return [
            *self.pools,
            *self.nodes,
            *self.blocks,
            *self.affinities,
            *self.namespaces,
            *self.pods,
            *self.endpoints,
            *self.policies,
        ]


def synthetic(pods: int, policies: int, node: str, local: int = 100, *, namespaces: int = 0, seed: int = 1) -> Cluster:
    """``pods`` pods over ``namespaces`` namespaces (default: one per 100 pods) on ceil(pods / local) nodes of
    ``local`` pods each, ``node`` being the first; ``policies`` policies of the shapes users write (same-namespace
    allow, app-to-app on a port, namespace whitelists, ipBlock egress)."""
    rnd = random.Random(seed)
    n_ns = namespaces or max(1, pods // 100)
    n_nodes = -(-pods // local)
    per_node_blocks = -(-(local + 1) // BLOCK)  # +1: the node's VXLAN tunnel address
    if RESERVED_BLOCKS + n_nodes * per_node_blocks > 1 << (POOL.block_size - POD_NET.prefixlen):
        raise ValueError(f"{pods} pods at {local} per node do not fit in {POOL.cidr}")
    out = Cluster(pools=[POOL])
    for j in range(n_ns):
        out.namespaces.append(m.Namespace(f"ns{j}", {"team": f"t{j % 7}", "kubernetes.io/metadata.name": f"ns{j}"}))
    for j in range(n_nodes):
        name = node_name(j, node)
        first = RESERVED_BLOCKS + j * per_node_blocks
        cidrs = [f"{POD_NET.network_address + (first + b) * BLOCK}/{POOL.block_size}" for b in range(per_node_blocks)]
        allocations: list[dict[int, m.Allocation]] = [{} for _ in cidrs]
        allocations[0][0] = m.Allocation(tunnel_handle(name, "vxlan"), None, "tunnel")
        tunnel = cidrs[0].split("/")[0]
        out.nodes.append(
            m.Node(
                name,
                f"192.168.{64 + j // 200}.{10 + j % 200}/16",
                vxlan_address=tunnel,
                vxlan_mac=pod_mac(f"vtep/{name}"),
                labels={"kubernetes.io/hostname": name, "topology.kubernetes.io/zone": f"z{j % 3}"},
            )
        )
        for q in range(min(local, pods - j * local)):
            i = j * local + q
            ns, pod = f"ns{i % n_ns}", f"p{i}"
            b, ordinal = divmod(q + 1, BLOCK)
            ip = str(ipaddress.IPv4Network(cidrs[b]).network_address + ordinal)
            cid = container_id(ns, pod)
            allocations[b][ordinal] = m.Allocation(pod_handle(cid), f"{ns}/{pod}", "pod")
            labels = {"app": APPS[i % len(APPS)], "tier": f"t{i % 3}", "idx": str(i % 10)}
            out.pods.append(m.Pod(ns, pod, labels, (ip,), name, (m.NamedPort("http", 8080 + i % 2, "TCP"),)))
            out.endpoints.append(
                m.Endpoint(name, ns, pod, "eth0", iface(ns, pod), (f"{ip}/32",), pod_mac(cid), cid, pod_handle(cid))
            )
        for cidr, allocs in zip(cidrs, allocations, strict=True):
            out.blocks.append(m.Block(cidr, f"node:{name}", allocs))
            out.affinities.append(m.Affinity(name, cidr))
    for k in range(policies):
        ns = f"ns{k % n_ns}"
        app = APPS[k % len(APPS)]
        shape = k % 4
        spec: dict[str, object]
        if shape == 0:
            spec = {"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}
        elif shape == 1:
            spec = {
                "podSelector": {"matchLabels": {"app": app}},
                "ingress": [
                    {
                        "from": [{"podSelector": {"matchLabels": {"app": APPS[(k + 1) % len(APPS)]}}}],
                        "ports": [{"port": 8000 + rnd.randrange(1000), "protocol": "TCP"}],
                    }
                ],
            }
        elif shape == 2:
            spec = {
                "podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["t0", "t1"]}]},
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": f"t{k % 7}"}}}]}],
            }
        else:
            spec = {
                "podSelector": {"matchLabels": {"app": app}},
                "policyTypes": ["Egress"],
                "egress": [
                    {
                        "to": [{"ipBlock": {"cidr": "198.51.100.0/24", "except": ["198.51.100.128/25"]}}],
                        "ports": [{"port": "http"}],
                    }
                ],
            }
        out.policies.append(m.Policy(ns, f"pol{k}", spec))
    return out


def customer_networks(n: int, *, seed: int = 7, allow: str | None = None) -> list[dict[str, object]]:
    """``n`` ipBlock peers as an allow-list of customer networks looks: disjoint public CIDRs of /16 to /32 (mostly
    /24 to /32), one in ten of the larger ones with one or two excepts; ``allow`` (a CIDR) is the last entry, so a
    linear ruleset meets it after all the others."""
    rnd = random.Random(seed)
    lengths = [16] * 2 + [20] * 4 + [22] * 6 + [24] * 30 + [27] * 8 + [28] * 10 + [29] * 8 + [30] * 4 + [32] * 28
    taken: set[int] = set()  # /16s with a CIDR already: keeps the list disjoint without an interval tree
    used: dict[int, list[ipaddress.IPv4Network]] = {}
    out: list[dict[str, object]] = []
    want = n - (1 if allow else 0)
    while len(out) < want:
        plen = rnd.choice(lengths)
        first_octet = rnd.choice([o for o in range(11, 224) if o not in (100, 127, 169, 172, 192, 198, 203)])
        addr = (first_octet << 24) | rnd.getrandbits(24)
        net = ipaddress.IPv4Network((addr, plen), strict=False)
        top = int(net.network_address) >> 16
        if plen == 16:
            if top in taken or top in used:
                continue
            taken.add(top)
        else:
            if top in taken or any(net.overlaps(o) for o in used.get(top, ())):
                continue
            used.setdefault(top, []).append(net)
        peer: dict[str, object] = {"cidr": str(net)}
        if plen <= 28 and rnd.random() < 0.1:
            subs = {
                str(next(net.subnets(new_prefix=min(32, plen + rnd.randrange(2, 9)))))
                if i == 0
                else str(list(net.subnets(new_prefix=min(32, plen + 2)))[-1])
                for i in range(rnd.choice((1, 2)))
            }
            peer["except"] = sorted(subs)
        out.append({"ipBlock": peer})
    if allow:
        out.append({"ipBlock": {"cidr": allow}})
    return out
