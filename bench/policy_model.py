"""Synthetic clusters for the policy benchmarks: pods, namespaces, policies and endpoints as the datastore holds
them, so the real compiler and writers see realistic input. Deterministic (seeded)."""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, field

from datastore import model as m

POD_NET = ipaddress.IPv4Network("10.244.0.0/16")
APPS = ("web", "api", "db", "cache", "queue", "auth", "search", "batch")


def pod_ip(i: int) -> str:
    # .0/.1 of each /24 skipped; 10.244.0.x is left for the real pods of a benchmark
    return str(POD_NET.network_address + 256 + (i // 250) * 256 + 2 + i % 250)


def iface(ns: str, pod: str) -> str:
    import hashlib

    return "cali" + hashlib.sha1(f"{ns}.{pod}".encode()).hexdigest()[:11]


@dataclass
class Cluster:
    pods: list[m.Pod] = field(default_factory=list)
    namespaces: list[m.Namespace] = field(default_factory=list)
    policies: list[m.Policy] = field(default_factory=list)
    endpoints: list[m.Endpoint] = field(default_factory=list)


def synthetic(
    pods: int, policies: int, node: str, local: int, *, namespaces: int = 0, seed: int = 1, other_nodes: int = 50
) -> Cluster:
    """``pods`` pods over ``namespaces`` namespaces (default: one per 100 pods), ``local`` of them on ``node`` with
    an endpoint, the rest spread over other nodes; ``policies`` policies of the shapes users write (same-namespace
    allow, app-to-app on a port, namespace whitelists, ipBlock egress)."""
    rnd = random.Random(seed)
    n_ns = namespaces or max(1, pods // 100)
    out = Cluster()
    for j in range(n_ns):
        out.namespaces.append(m.Namespace(f"ns{j}", {"team": f"t{j % 7}", "kubernetes.io/metadata.name": f"ns{j}"}))
    for i in range(pods):
        ns = f"ns{i % n_ns}"
        name = f"p{i}"
        host = node if i < local else f"node{i % other_nodes}"
        labels = {"app": APPS[i % len(APPS)], "tier": f"t{i % 3}", "idx": str(i % 10)}
        out.pods.append(m.Pod(ns, name, labels, (pod_ip(i),), host, (m.NamedPort("http", 8080 + i % 2, "TCP"),)))
        if host == node:
            out.endpoints.append(m.Endpoint(node, ns, name, "eth0", iface(ns, name), (f"{pod_ip(i)}/32",)))
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
