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
    # Why the agent cannot give this pod verdicts yet (None: it can). Such a pod gets no traffic either way.
    pending: str | None = None

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


POD_PENDING = "pod record not yet known: no traffic in either direction until it arrives"
NAMESPACE_PENDING = (
    "namespace record not yet known and a namespaceSelector needs its labels: no traffic in either direction until"
    " it arrives"
)


def pod_view(key: PodKey, pod: m.Pod | None, endpoints: Iterable[m.Endpoint]) -> PodView | None:
    """A pod as policy sees it, from its object and its endpoints. An endpoint whose pod object has not arrived yet
    (the CNI writes endpoints, the controller pods: nothing orders them) is a pod whose labels we do not know, so
    no verdict about it can be trusted: it is ``pending`` and isolated both ways (fail closed)."""
    eps = list(endpoints)
    if pod is None:
        if not eps:
            return None
        ips = _ipv4(ip for ep in eps for ip in ep.ips)
        return PodView(key[0], key[1], {}, ips, eps[0].node, pending=POD_PENDING)
    ips = _ipv4([*pod.ips, *(ip for ep in eps for ip in ep.ips)])
    node = pod.node or next((ep.node for ep in eps), None)
    return PodView(pod.namespace, pod.name, dict(pod.labels), ips, node, pod.named_ports)


def pod_namespaces(snap: Snapshot) -> set[str]:
    return {k[0] for k in snap.pods} | {k[1] for k in snap.endpoints}


def namespace_labels(snap: Snapshot, pod_ns: set[str] | None = None) -> dict[str, dict[str, str]]:
    """Every namespace that exists or is implied (by a pod, an endpoint or a policy in it), with its labels.
    ``pod_ns``: the namespaces of pods and endpoints, when the caller knows them already."""
    names = set(snap.namespaces) | {k[0] for k in snap.policies}
    names |= pod_namespaces(snap) if pod_ns is None else pod_ns
    out = {}
    for ns in names:
        stored = snap.namespaces.get(ns)
        out[ns] = {**(stored.labels if stored else {}), NAME_LABEL: ns}
    return out


def node_addresses(snap: Snapshot) -> dict[str, frozenset[str]]:
    out = {}
    for name, n in snap.nodes.items():
        addrs = {n.address}
        addrs.update(a for a in (n.tunnel_address, n.vxlan_address) if a)
        out[name] = frozenset(addrs)
    return out


@dataclass
class World:
    """Mutable: the compiler adds and removes pods as snapshots change; the indexes follow."""

    pods: dict[PodKey, PodView] = field(default_factory=dict)
    ns_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    recorded_namespaces: frozenset[str] = frozenset()  # namespaces whose record (with its labels) is known
    # Some policy's namespaceSelector reads namespace labels: a pod whose namespace record is missing is pending.
    ns_labels_needed: bool = False
    node_addresses: dict[str, frozenset[str]] = field(default_factory=dict)
    # Ordered sets (dicts with None values) so removal is O(1).
    _by_ns: dict[str, dict[PodKey, None]] = field(default_factory=dict)
    _by_label: dict[tuple[str, str, str], dict[PodKey, None]] = field(default_factory=dict)  # (ns, key, value) ->
    _by_port_name: dict[str, dict[PodKey, None]] = field(default_factory=dict)
    _ns_cache: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def from_snapshot(cls, snap: Snapshot) -> World:
        w = cls(
            ns_labels=namespace_labels(snap),
            node_addresses=node_addresses(snap),
            recorded_namespaces=frozenset(snap.namespaces),
        )
        eps: dict[PodKey, list[m.Endpoint]] = defaultdict(list)
        for ep in snap.endpoints.values():
            eps[(ep.namespace, ep.pod)].append(ep)
        for key in sorted(set(snap.pods) | set(eps)):
            view = pod_view(key, snap.pods.get(key), eps.get(key, ()))
            if view is not None:
                w.add(view)
        return w

    def add(self, view: PodView) -> None:
        key = view.key
        self.pods[key] = view
        self._by_ns.setdefault(key[0], {})[key] = None
        for lk, lv in view.labels.items():
            self._by_label.setdefault((key[0], lk, lv), {})[key] = None
        for p in view.named_ports:
            self._by_port_name.setdefault(p.name, {})[key] = None

    def remove(self, key: PodKey) -> PodView | None:
        view = self.pods.pop(key, None)
        if view is None:
            return None
        self._by_ns[key[0]].pop(key, None)
        for lk, lv in view.labels.items():
            self._by_label[(key[0], lk, lv)].pop(key, None)
        for p in view.named_ports:
            self._by_port_name[p.name].pop(key, None)
        return view

    def pending(self, key: PodKey) -> str | None:
        """Why ``key`` gets no traffic yet (fail closed), or None when its verdicts can be computed."""
        view = self.pods.get(key)
        if view is None or view.pending is not None:
            return view.pending if view is not None else POD_PENDING
        if self.ns_labels_needed and key[0] not in self.recorded_namespaces:
            return NAMESPACE_PENDING
        return None

    def namespaces_matching(self, sel: Selector) -> list[str]:
        text = sel.text()
        if text not in self._ns_cache:
            self._ns_cache[text] = sorted(ns for ns, labels in self.ns_labels.items() if sel.matches(labels))
        return self._ns_cache[text]

    def select(self, namespaces: Iterable[str], sel: Selector) -> list[PodKey]:
        """Pods of ``namespaces`` whose labels match ``sel``. An equality in the selector narrows the candidates
        through the label index instead of scanning each namespace."""
        eqs = sel.equalities()
        out: list[PodKey] = []
        for ns in sorted(set(namespaces)):
            candidates: dict[PodKey, None]
            if eqs:
                candidates = min((self._by_label.get((ns, k, v), {}) for k, v in eqs), key=len)
            else:
                candidates = self._by_ns.get(ns, {})
            out += [k for k in candidates if sel.matches(self.pods[k].labels)]
        return out

    def with_port_name(self, name: str) -> list[PodKey]:
        return list(self._by_port_name.get(name, {}))
