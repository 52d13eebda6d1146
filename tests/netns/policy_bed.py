"""A two-node cluster in network namespaces for the policy tests: pods wired as podnet's CNI does, direct routes
between the nodes' pod subnets over the underlay, an "outside host" at 198.51.100.7 behind the underlay's router,
and each node's filter table and ipsets programmed from the pure compiler by the dataplane writer."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from agent.calc.policy import compile_node
from agent.calc.snapshot import Snapshot
from agent.dataplane.backend import detect
from agent.dataplane.cmd import Runner
from agent.dataplane.programmer import PolicyDataplane
from datastore import model as m
from testbed.netns import Netns, NetnsBed, Node, Pod, sh

OUTSIDE_IP = "198.51.100.7"
NODE_SUBNETS = {"node1": "10.244.1.0/24", "node2": "10.244.2.0/24"}


@dataclass
class Cluster:
    bed: NetnsBed
    nodes: dict[str, Node]
    pods: dict[str, Pod]  # "ns/name" ->
    labels: dict[str, dict[str, str]]
    ns_labels: dict[str, dict[str, str]]
    outside: Netns
    named_ports: dict[str, tuple[m.NamedPort, ...]] = field(default_factory=dict)
    writers: dict[str, PolicyDataplane] = field(default_factory=dict)

    def snapshot(self, policies: list[m.Policy]) -> Snapshot:
        pods = {}
        endpoints = {}
        for key, pod in self.pods.items():
            ns, name = key.split("/")
            pods[(ns, name)] = m.Pod(
                ns, name, self.labels[key], (pod.ip,), pod.node.name, self.named_ports.get(key, ())
            )
            ep = m.Endpoint(pod.node.name, ns, name, "eth0", pod.host_iface, (f"{pod.ip}/32",))
            endpoints[(pod.node.name, ns, name, "eth0")] = ep
        return Snapshot(
            revision=1,
            in_sync=True,
            nodes={n: m.Node(n, node.ip) for n, node in self.nodes.items()},
            namespaces={ns: m.Namespace(ns, labels) for ns, labels in self.ns_labels.items()},
            pods=pods,
            policies={(p.namespace, p.name): p for p in policies},
            endpoints=endpoints,
        )

    def program(self, policies: list[m.Policy]) -> None:
        """Compile for each node and sync its kernel (a full sync, as after a restart)."""
        snap = self.snapshot(policies)
        for name, writer in self.writers.items():
            writer.apply(compile_node(snap, name).state, full=True, delete_stale=True)

    def source(self, who: str) -> Netns:
        if who == "outside":
            return self.outside
        if who in self.nodes:
            return self.nodes[who].ns
        return self.pods[who].ns

    def address(self, who: str) -> str:
        return OUTSIDE_IP if who == "outside" else self.pods[who].ip

    def probe(self, checks: list[tuple[str, str, str, int]], timeout: float = 0.6) -> list[bool]:
        """Real connections (TCP handshake, or UDP request and answer), in parallel."""

        def one(c: tuple[str, str, str, int]) -> bool:
            src, dst, proto, port = c
            return self.source(src).connect(proto, self.address(dst), port, timeout=timeout)

        with ThreadPoolExecutor(max_workers=12) as pool:
            return list(pool.map(one, checks))


def build(
    bed: NetnsBed,
    pods: dict[str, tuple[str, str, dict[str, str]]],  # "ns/name" -> (node, ip, labels)
    ns_labels: dict[str, dict[str, str]],
    *,
    listen: list[tuple[str, int]],
    outside_listen: list[tuple[str, int]],
    named_ports: dict[str, tuple[m.NamedPort, ...]] | None = None,
) -> Cluster:
    ul = bed.underlay()
    nodes = {"node1": bed.node("node1", ul, 11), "node2": bed.node("node2", ul, 12)}
    # Direct routing: each node reaches the other's pod subnet through the underlay; so does the underlay router.
    ul.ns.sysctl("net.ipv4.ip_forward", "1")
    for name, node in nodes.items():
        for other, subnet in NODE_SUBNETS.items():
            if other != name:
                node.ns.ip("route", "add", subnet, "via", nodes[other].address)
        ul.ns.ip("route", "add", NODE_SUBNETS[name], "via", node.address)
    # The outside host: a namespace behind the underlay router, in the documentation range.
    outside = bed.netns("outside")
    sh("ip", "link", "add", "out0", "netns", ul.ns.name, "type", "veth", "peer", "name", "eth0", "netns", outside.name)
    ul.ns.ip("addr", "add", "198.51.100.1/24", "dev", "out0")
    ul.ns.ip("link", "set", "out0", "up")
    outside.ip("addr", "add", f"{OUTSIDE_IP}/24", "dev", "eth0")
    outside.ip("link", "set", "eth0", "up")
    outside.ip("route", "add", "default", "via", "198.51.100.1")
    made = {key: bed.pod(nodes[node], *key.split("/"), ip) for key, (node, ip, _) in pods.items()}
    for pod, (proto, port) in itertools.product(made.values(), listen):
        pod.ns.listen(proto, port)
    for proto, port in outside_listen:
        outside.listen(proto, port)
    cluster = Cluster(bed, nodes, made, {k: v[2] for k, v in pods.items()}, ns_labels, outside, dict(named_ports or {}))
    for name, node in nodes.items():
        runner = Runner(netns=node.ns.name)
        cluster.writers[name] = PolicyDataplane(runner, detect(runner))
    return cluster


def mismatches(cluster: Cluster, checks: list[tuple[str, str, str, int, bool]]) -> list[Any]:
    got = cluster.probe([c[:4] for c in checks])
    return [
        (*c[:4], "expected", "allowed" if c[4] else "denied") for c, ok in zip(checks, got, strict=True) if ok != c[4]
    ]
