"""The cluster as policy sees it: every pod with its labels, IPv4 addresses and named ports, every namespace's
labels, every node's addresses, built once per compile from a ``Snapshot``, with indexes so selecting pods does not
scan the cluster for each selector."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from agent.calc.policy.selector import Selector
from agent.calc.snapshot import Snapshot
from datastore import model as m

PodKey = tuple[str, str]  # (namespace, name)
# The API server labels every namespace with its own name; selecting a namespace by name relies on it.
NAME_LABEL = "kubernetes.io/metadata.name"


@dataclass(frozen=True)
class PodView:
    namespace: str
    name: str
    labels: dict[str, str]
    ips: tuple[str, ...]  # IPv4 only: the dataplane programs IPv4 iptables and ipsets
    node: str | None
    named_ports: tuple[m.NamedPort, ...] = ()

    @property
    def key(self) -> PodKey:
        return (self.namespace, self.name)

    def named_port(self, name: str, protocol: str) -> int | None:
        for p in self.named_ports:
            if p.name == name and p.protocol == protocol:
                return p.port
        return None


def _ipv4(addrs: Iterable[str]) -> tuple[str, ...]:
    """IPv4 addresses without prefix length, first seen first. The models hold validated, normalised addresses, so
    the text is enough (parsing 50 000 of them with ipaddress would dominate a compile)."""
    out: list[str] = []
    for a in addrs:
        ip = a.split("/", 1)[0]
        if ":" not in ip and ip not in out:
            out.append(ip)
    return tuple(out)


@dataclass
class World:
    pods: dict[PodKey, PodView] = field(default_factory=dict)
    ns_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    node_addresses: dict[str, frozenset[str]] = field(default_factory=dict)
    _by_ns: dict[str, list[PodKey]] = field(default_factory=dict)
    _by_label: dict[tuple[str, str, str], list[PodKey]] = field(default_factory=dict)  # (ns, key, value) ->
    _ns_cache: dict[str, list[str]] = field(default_factory=dict)
    _by_port_name: dict[str, list[PodKey]] = field(default_factory=dict)

    @classmethod
    def from_snapshot(cls, snap: Snapshot) -> World:
        w = cls()
        eps: dict[PodKey, list[m.Endpoint]] = defaultdict(list)
        for ep in snap.endpoints.values():
            eps[(ep.namespace, ep.pod)].append(ep)
        for key, pod in snap.pods.items():
            ips = _ipv4([*pod.ips, *(ip for ep in eps.get(key, []) for ip in ep.ips)])
            node = pod.node or next((ep.node for ep in eps.get(key, [])), None)
            w.pods[key] = PodView(pod.namespace, pod.name, dict(pod.labels), ips, node, pod.named_ports)
        # An endpoint whose pod object has not arrived yet is still a pod: it has no labels we know of.
        for key, ep_list in eps.items():
            if key not in w.pods:
                ips = _ipv4(ip for ep in ep_list for ip in ep.ips)
                w.pods[key] = PodView(key[0], key[1], {}, ips, ep_list[0].node)
        namespaces = set(snap.namespaces) | {k[0] for k in w.pods} | {k[0] for k in snap.policies}
        for ns in namespaces:
            stored = snap.namespaces.get(ns)
            w.ns_labels[ns] = {**(stored.labels if stored else {}), NAME_LABEL: ns}
        for name, n in snap.nodes.items():
            addrs = {n.address}
            addrs.update(a for a in (n.tunnel_address, n.vxlan_address) if a)
            w.node_addresses[name] = frozenset(addrs)
        for key, view in sorted(w.pods.items()):
            w._by_ns.setdefault(key[0], []).append(key)
            for lk, lv in view.labels.items():
                w._by_label.setdefault((key[0], lk, lv), []).append(key)
            for p in view.named_ports:
                w._by_port_name.setdefault(p.name, []).append(key)
        return w

    def namespaces_matching(self, sel: Selector) -> list[str]:
        text = sel.text()
        if text not in self._ns_cache:
            self._ns_cache[text] = sorted(ns for ns, labels in self.ns_labels.items() if sel.matches(labels))
        return self._ns_cache[text]

    def select(self, namespaces: Iterable[str], sel: Selector) -> list[PodKey]:
        """Pods of ``namespaces`` whose labels match ``sel``, in key order. An equality in the selector narrows
        the candidates through the label index instead of scanning each namespace."""
        eqs = sel.equalities()
        out: list[PodKey] = []
        for ns in sorted(set(namespaces)):
            if eqs:
                candidates = min((self._by_label.get((ns, k, v), []) for k, v in eqs), key=len)
            else:
                candidates = self._by_ns.get(ns, [])
            out += [k for k in candidates if sel.matches(self.pods[k].labels)]
        return out

    def with_port_name(self, name: str) -> list[PodKey]:
        return self._by_port_name.get(name, [])

    def node_of(self, ip: str) -> str | None:
        for node, addrs in self.node_addresses.items():
            if ip in addrs:
                return node
        return None
