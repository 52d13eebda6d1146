"""A two-node cluster in network namespaces for the policy tests: pods wired as podnet's CNI does, direct routes
between the nodes' pod subnets over the underlay, an "outside host" at 198.51.100.7 behind the underlay's router,
and each node's filter table and ipsets programmed from the pure compiler by the dataplane writer."""

from __future__ import annotations

import ipaddress
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from agent.calc.policy import PolicyCompiler, compile_node
from agent.calc.snapshot import Snapshot
from agent.dataplane.backend import detect
from agent.dataplane.cmd import CommandRunner
from agent.dataplane.programmer import PolicyDataplane
from datastore import model as m
from testbed.netns import Netns, NetnsBed, NodeNs, Pod, sh

OUTSIDE_IP = "198.51.100.7"
NODE_SUBNETS = {"node1": "10.244.1.0/24", "node2": "10.244.2.0/24"}
# Outside hosts sit on a bridge of the underlay router that is the gateway of both documentation ranges.
OUTSIDE_GATEWAYS = {"198.51.100.0/24": "198.51.100.1", "192.0.2.0/24": "192.0.2.254"}


def listen_many(ns: Netns, ports: list[tuple[str, int]]) -> None:
    specs = (f"{proto}/{port}" for proto, port in sorted(set(ports)))
    proc = ns.popen(sys.executable, "-m", "testbed.probe", "serve-many", *specs)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        raise RuntimeError(f"server in {ns.name} did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}")


@dataclass
class Cluster:
    bed: NetnsBed
    nodes: dict[str, NodeNs]
    pods: dict[str, Pod]  # "ns/name" ->
    labels: dict[str, dict[str, str]]
    ns_labels: dict[str, dict[str, str]]
    outside: dict[str, Netns]  # address ->
    named_ports: dict[str, tuple[m.NamedPort, ...]] = field(default_factory=dict)
    writers: dict[str, PolicyDataplane] = field(default_factory=dict)
    # One incremental compiler per node, kept across programs, as the agent keeps it across snapshots.
    compilers: dict[str, PolicyCompiler] = field(default_factory=dict)

    # The models of the cluster, made once: like the agent's cache, unchanged objects stay the same objects from one
    # snapshot to the next, so the compilers take their incremental path.
    _models: dict[str, Any] = field(default_factory=dict)

    def snapshot(self, policies: list[m.Policy]) -> Snapshot:
        if not self._models:
            pods: dict[tuple[str, str], m.Pod] = {}
            endpoints: dict[tuple[str, str, str, str], m.Endpoint] = {}
            for key, pod in self.pods.items():
                ns, name = key.split("/")
                ports = self.named_ports.get(key, ())
                pods[(ns, name)] = m.Pod(ns, name, self.labels[key], (pod.ip,), pod.node.name, ports)
                ep = m.Endpoint(pod.node.name, ns, name, "eth0", pod.host_iface, (f"{pod.ip}/32",))
                endpoints[(pod.node.name, ns, name, "eth0")] = ep
            self._models = {
                "pods": pods,
                "endpoints": endpoints,
                "nodes": {n: m.Node(n, node.ip) for n, node in self.nodes.items()},
                "namespaces": {ns: m.Namespace(ns, labels) for ns, labels in self.ns_labels.items()},
            }
        return Snapshot(
            revision=1,
            in_sync=True,
            nodes=dict(self._models["nodes"]),
            namespaces=dict(self._models["namespaces"]),
            pods={k: v for k, v in self._models["pods"].items() if f"{k[0]}/{k[1]}" in self.pods},
            policies={(p.namespace, p.name): p for p in policies},
            endpoints={k: v for k, v in self._models["endpoints"].items() if f"{k[1]}/{k[2]}" in self.pods},
        )

    def program(self, policies: list[m.Policy]) -> None:
        """Compile for each node and sync its kernel (a full sync, as after a restart)."""
        snap = self.snapshot(policies)
        for name, writer in self.writers.items():
            state = compile_node(snap, name, self.compilers.setdefault(name, PolicyCompiler())).state
            assert state == compile_node(snap, name).state  # the incremental path gives the fresh result
            writer.apply(state, full=True, delete_stale=True)

    def source(self, who: str) -> Netns:
        """A pod ("ns/name"), a node (by name or address), or an outside host ("outside" or its address)."""
        if who in self.pods:
            return self.pods[who].ns
        for name, node in self.nodes.items():
            if who in (name, node.address):
                return node.ns
        return self.outside[OUTSIDE_IP if who == "outside" else who]

    def address(self, who: str) -> str:
        if who in self.pods:
            return self.pods[who].ip
        return OUTSIDE_IP if who == "outside" else who

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
    outside_ips: tuple[str, ...] = (OUTSIDE_IP,),
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
    # Outside hosts: namespaces on a second bridge of the underlay router, in the documentation ranges.
    ul.ns.ip("link", "add", "brout", "type", "bridge")
    ul.ns.ip("link", "set", "brout", "up")
    for subnet, gw in OUTSIDE_GATEWAYS.items():
        ul.ns.ip("addr", "add", f"{gw}/{subnet.split('/')[1]}", "dev", "brout")
    outside: dict[str, Netns] = {}
    for i, ip in enumerate(outside_ips):
        host = bed.netns(f"out{i}")
        link = f"o{i}"
        sh("ip", "link", "add", link, "netns", ul.ns.name, "type", "veth", "peer", "name", "eth0", "netns", host.name)
        ul.ns.ip("link", "set", link, "master", "brout", "up")
        subnet = next(s for s in OUTSIDE_GATEWAYS if ipaddress.ip_address(ip) in ipaddress.ip_network(s))
        host.ip("addr", "add", f"{ip}/{subnet.split('/')[1]}", "dev", "eth0")
        host.ip("link", "set", "eth0", "up")
        host.ip("route", "add", "default", "via", OUTSIDE_GATEWAYS[subnet])
        listen_many(host, outside_listen)
        outside[ip] = host
    made = {key: bed.pod(nodes[node], *key.split("/"), ip) for key, (node, ip, _) in pods.items()}
    for pod in made.values():
        listen_many(pod.ns, listen)
    labels = {k: v[2] for k, v in pods.items()}
    cluster = Cluster(bed, nodes, made, labels, ns_labels, outside, dict(named_ports or {}))
    for name, node in nodes.items():
        runner = CommandRunner(netns=node.ns.name)
        cluster.writers[name] = PolicyDataplane(runner, detect(runner))
    return cluster


def mismatches(cluster: Cluster, checks: list[tuple[str, str, str, int, bool]]) -> list[Any]:
    got = cluster.probe([c[:4] for c in checks])
    return [
        (*c[:4], "expected", "allowed" if c[4] else "denied") for c, ok in zip(checks, got, strict=True) if ok != c[4]
    ]
