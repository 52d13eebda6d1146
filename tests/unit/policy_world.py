"""A small cluster for the policy tests: namespaces nsa, nsb, nsc, default; pods on node1 and node2."""

from __future__ import annotations

from typing import Any

from agent.calc.snapshot import Snapshot
from datastore import model as m
from testbed.netns import cali_name

NODES = {
    "node1": m.Node("node1", "192.168.77.11/24"),
    "node2": m.Node("node2", "192.168.77.12/24"),
}
NAMESPACES = {
    "nsa": {"app": "nsa"},
    "nsb": {"app": "nsb"},
    "nsc": {"team": "x"},
    "default": {},
}
# name -> (labels, ip, node, named ports)
PODS: dict[str, tuple[dict[str, str], str, str, tuple[m.NamedPort, ...]]] = {
    "nsa/a1": (
        {"app": "web", "role": "frontend"},
        "10.244.1.10",
        "node1",
        (m.NamedPort("http", 8080), m.NamedPort("dns", 53, "UDP")),
    ),
    "nsa/a2": ({"app": "db"}, "10.244.1.11", "node1", (m.NamedPort("http", 9090),)),
    "nsa/a3": ({"app": "client"}, "10.244.2.13", "node2", ()),
    "nsb/b1": ({"app": "web"}, "10.244.2.10", "node2", ()),
    "nsb/b2": ({"app": "client", "tier": "gold"}, "10.244.1.12", "node1", ()),
    "default/d1": ({"app": "web"}, "10.244.2.11", "node2", ()),
    "nsc/c1": ({"tier": "silver"}, "10.244.2.12", "node2", ()),
}
OUTSIDE = "198.51.100.7"
OUTSIDE_HIGH = "198.51.100.200"


def policy(ns: str, name: str, spec: dict[str, Any]) -> m.Policy:
    return m.Policy(ns, name, spec)


def snapshot(*policies: m.Policy, pods: dict[str, Any] | None = None) -> Snapshot:
    pod_models = {}
    endpoints = {}
    for key, (labels, ip, node, ports) in (pods or PODS).items():
        ns, name = key.split("/")
        pod_models[(ns, name)] = m.Pod(ns, name, labels, (ip,), node, ports)
        iface = cali_name(ns, name)
        endpoints[(node, ns, name, "eth0")] = m.Endpoint(node, ns, name, "eth0", iface, (f"{ip}/32",))
    return Snapshot(
        revision=1,
        in_sync=True,
        nodes=dict(NODES),
        namespaces={ns: m.Namespace(ns, labels) for ns, labels in NAMESPACES.items()},
        pods=pod_models,
        policies={(p.namespace, p.name): p for p in policies},
        endpoints=endpoints,
    )
