"""Policies → the node-independent intermediate form both the kernel rules and ``explain`` are made from.

Each peer becomes an ipset (pod IPs of a selector, or an ipBlock as hash:net with ``nomatch`` excepts); each named
port becomes a hash:ip,port set of the pods that carry that name. A rule is then "peer set x port match", so the
number of rules a packet meets depends on the policies selecting its pod, never on how many pods a selector picks.

An invalid policy is reported and compiled with no rules in the directions it declares, for the pods it selects
(its whole namespace when even its pod selector is unreadable): broken input isolates, it never opens.
"""

from __future__ import annotations

import ipaddress
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from itertools import compress
from typing import Any, TypeVar, cast

from agent.calc.policy import names
from agent.calc.policy.selector import Selector
from agent.calc.policy.spec import (
    DIRECTIONS,
    EGRESS,
    INGRESS,
    IpBlock,
    Peer,
    PolicyError,
    PolicySpec,
    Port,
    declared_directions,
    declared_selector,
    ipv4_span,
    ipv4_text,
    parse_spec,
)
from agent.calc.policy.world import (
    NAME_LABEL,
    PodKey,
    PodView,
    World,
    namespace_labels,
    node_addresses,
    pod_view,
)
from agent.calc.snapshot import Changes, Snapshot
from agent.calc.state import IpSet
from datastore import model as m

K = TypeVar("K")


@dataclass(frozen=True)
class PeerMatch:
    set_name: str
    text: str  # for explain, e.g. "pods app=db in namespace nsa"


@dataclass(frozen=True)
class PortMatch:
    protocol: str
    port: int | None = None
    end_port: int | None = None
    named_set: str | None = None  # hash:ip,port of destinations that carry the named port
    text: str = ""


@dataclass(frozen=True)
class CompiledRule:
    policy: str  # "<namespace>/<name>"
    direction: str
    index: int
    peers: tuple[PeerMatch, ...] | None  # None: any peer; (): no peer can match (e.g. only IPv6 ipBlocks)
    ports: tuple[PortMatch, ...] | None  # None: any port and protocol

    @property
    def label(self) -> str:
        return f"{self.policy} {self.direction.lower()} rule {self.index}"


@dataclass(frozen=True)
class PolicyStatus:
    namespace: str
    name: str
    accepted: bool
    reason: str = ""

    def to_json(self) -> dict[str, object]:
        return {"namespace": self.namespace, "name": self.name, "accepted": self.accepted, "reason": self.reason}


@dataclass(frozen=True)
class CompiledPolicy:
    namespace: str
    name: str
    directions: tuple[str, ...]
    selected: frozenset[PodKey]
    ingress: tuple[CompiledRule, ...] = ()
    egress: tuple[CompiledRule, ...] = ()
    error: str | None = None

    @property
    def ident(self) -> str:
        return f"{self.namespace}/{self.name}"

    def rules(self, direction: str) -> tuple[CompiledRule, ...]:
        return self.ingress if direction == INGRESS else self.egress


@dataclass
class Compiled:
    """The compiled policies over one snapshot. Produced by ``PolicyCompiler.update``, which keeps mutating its
    parts: a ``Compiled`` is valid until the next update of the compiler that made it (``DataplaneState`` built
    from it holds only immutable values and stays valid)."""

    world: World
    policies: dict[tuple[str, str], CompiledPolicy] = field(default_factory=dict)
    ipsets: dict[str, IpSet] = field(default_factory=dict)
    statuses: dict[tuple[str, str], PolicyStatus] = field(default_factory=dict)
    selecting: dict[PodKey, set[tuple[str, str]]] = field(default_factory=dict)  # pod -> policies selecting it
    # Rendered chains of the objects above, reused while those objects are unchanged (agent.calc.policy.chains).
    memo: dict[tuple[str, ...], Any] = field(default_factory=dict, compare=False, repr=False)

    def policies_for(self, pod: PodKey, direction: str) -> list[CompiledPolicy]:
        """The policies selecting ``pod`` in ``direction``, in (namespace, name) order."""
        keys = sorted(self.selecting.get(pod, ()))
        return [self.policies[k] for k in keys if direction in self.policies[k].directions]


@dataclass
class _SetDef:
    """What defines an ipset's members, so a pod change can update just the sets it touches."""

    name: str
    type: str
    scope: frozenset[str] | None = None  # namespaces whose pods may be members; None: all
    selector: Selector = field(default_factory=Selector)
    port_name: str | None = None  # named-port sets
    protocol: str = "TCP"
    counts: dict[str, int] = field(default_factory=dict)  # member -> how many pods contribute it
    refs: int = 0  # rules using the set

    def contributions(self, view: PodView) -> list[str]:
        if self.type == "hash:net" or (self.scope is not None and view.namespace not in self.scope):
            return []
        if not self.selector.matches(view.labels):
            return []
        if self.port_name is None:
            return list(view.ips)
        number = view.named_port(self.port_name, self.protocol)
        return [] if number is None else [f"{ip},{self.protocol.lower()}:{number}" for ip in view.ips]

    def add(self, members: Iterable[str]) -> None:
        for x in members:
            self.counts[x] = self.counts.get(x, 0) + 1

    def discard(self, members: Iterable[str]) -> None:
        for x in members:
            n = self.counts.get(x, 0) - 1
            if n > 0:
                self.counts[x] = n
            else:
                self.counts.pop(x, None)


@dataclass
class _Entry:
    source: m.Policy | str  # a str: the key's stored value cannot be read (the reason)
    compiled: CompiledPolicy
    selector: Selector  # what decides ``selected`` (a broken policy's fallback included)
    sets: list[str] = field(default_factory=list)
    needs_ns_labels: bool = False  # a namespaceSelector of it reads namespace labels (beyond the name)


def _changed_keys(new: Mapping[K, object], old: Mapping[K, object]) -> list[K]:
    """Keys added, removed or holding another object. Runs in C when the key order is unchanged (the agent's
    cache keeps it: a changed key keeps its place), which matters at 50 000 pods."""
    if len(new) == len(old) and list(new) == list(old):
        return list(compress(new, map(operator.is_not, new.values(), old.values())))
    out = [k for k, v in new.items() if old.get(k) is not v]
    return out + [k for k in old if k not in new]


# More changed pods than this in one update: rebuilding from scratch is cheaper than patching every set.
REBUILD_THRESHOLD = 500


class PolicyCompiler:
    """Policies → rules over ipsets, updated incrementally from one snapshot to the next.

    A snapshot's values are immutable and the agent's cache hands out the same object for a key that did not
    change, so changes are found by identity: changed pods patch the sets and selections they touch, changed
    policies are recompiled, everything else is reused. A change of namespaces (or of many pods) rebuilds. The
    result is always exactly what a fresh compile of the same snapshot gives (a unit test checks that on random
    change sequences)."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.world = World()
        self._out = Compiled(self.world)
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._by_ns: dict[str, set[tuple[str, str]]] = {}  # namespace -> its policies
        self._sets: dict[str, _SetDef] = {}
        self._dirty_sets: set[str] = set()
        self._pods: Mapping[PodKey, m.Pod] = {}
        self._eps: Mapping[tuple[str, str, str, str], m.Endpoint] = {}
        self._eps_by_pod: dict[PodKey, dict[tuple[str, str, str, str], m.Endpoint]] = {}
        self._namespaces: Mapping[str, m.Namespace] = {}
        self._pod_ns: set[str] | None = None
        self._ns_label_readers = 0  # entries whose namespaceSelectors read namespace labels
        self._ns_refs: dict[str, int] = {}  # namespace -> its pod and endpoint keys
        self._last: Snapshot | None = None  # the snapshot the compiled state reflects

    def update(self, snap: Snapshot) -> Compiled:
        # What changed since the last update: from the cache's journal when both snapshots come from one cache
        # (O(changed)), else by comparing the maps.
        changes = snap.changes_since(self._last)
        rebuilt = self._update_pods(snap, changes)
        self._pods, self._eps, self._namespaces = snap.pods, snap.endpoints, snap.namespaces
        if rebuilt or changes is None or "nodes" in changes:
            self.world.node_addresses = node_addresses(snap)
        if rebuilt or changes is None or "namespaces" in changes:
            self.world.recorded_namespaces = frozenset(snap.namespaces)
        if rebuilt or changes is None:
            policy_keys: Iterable[tuple[str, str]] = set(self._entries) | set(snap.policies) | set(snap.broken_policies)
        else:
            policy_keys = cast(
                "frozenset[tuple[str, str]]",
                changes.get("policies", frozenset()) | changes.get("broken_policies", frozenset()),
            )
        for key in sorted(policy_keys):
            new: m.Policy | str | None = snap.policies.get(key)
            if new is None:
                new = snap.broken_policies.get(key)
            old = self._entries.get(key)
            if old is not None and (old.source is new or (isinstance(new, str) and old.source == new)):
                continue
            if old is None and new is None:
                continue
            self._set_policy(key, new)
        self._last = snap
        self.world.ns_labels_needed = self._ns_label_readers > 0
        for name in self._dirty_sets:
            d = self._sets.get(name)
            if d is not None:
                self._out.ipsets[name] = IpSet(name, d.type, frozenset(d.counts))
        self._dirty_sets.clear()
        return self._out

    # --- pods --------------------------------------------------------------------------------------------------

    def _update_pods(self, snap: Snapshot, changes: Changes | None) -> bool:
        """Bring the world's pods up to ``snap``; True when it was rebuilt from scratch (then every policy must
        be compiled again)."""
        changed_pods = self._pod_changes(snap, changes)
        # Pods' namespaces can only change when a pod or endpoint appears or goes: kept as counts per namespace
        # so that this costs what changed, not a scan of 50 000 keys.
        appeared_or_gone = False
        for pod_key, endpoint_keys in changed_pods.items():
            for was, now, ns in [
                (pod_key in self._pods, pod_key in snap.pods, pod_key[0]),
                *((ek in self._eps, ek in snap.endpoints, ek[1]) for ek in endpoint_keys),
            ]:
                if was != now:
                    appeared_or_gone = True
                    self._ns_refs[ns] = self._ns_refs.get(ns, 0) + (1 if now else -1)
        if self._pod_ns is None or changes is None:
            self._ns_refs = {}
            for key in snap.pods:
                self._ns_refs[key[0]] = self._ns_refs.get(key[0], 0) + 1
            for ek in snap.endpoints:
                self._ns_refs[ek[1]] = self._ns_refs.get(ek[1], 0) + 1
            self._pod_ns = {ns for ns, n in self._ns_refs.items() if n > 0}
        elif appeared_or_gone:
            self._pod_ns = {ns for ns, n in self._ns_refs.items() if n > 0}
        ns_inputs_changed = (
            changes is None
            or appeared_or_gone
            or any(name in changes for name in ("namespaces", "policies", "broken_policies"))
        )
        changed_ns = False
        if ns_inputs_changed:
            ns_labels = namespace_labels(snap, self._pod_ns)
            candidates: Iterable[str] = (
                snap.namespaces if changes is None else cast("frozenset[str]", changes.get("namespaces", frozenset()))
            )
            changed_ns = ns_labels != self.world.ns_labels or any(
                self._namespaces.get(k) is not snap.namespaces.get(k) for k in candidates
            )
        if changed_ns or len(changed_pods) > REBUILD_THRESHOLD:
            refs, pod_ns = self._ns_refs, self._pod_ns
            self._reset()
            self._ns_refs, self._pod_ns = refs, pod_ns
            self.world = World.from_snapshot(snap)
            self._out = Compiled(self.world)
            for ek, ep in snap.endpoints.items():
                self._eps_by_pod.setdefault((ek[1], ek[2]), {})[ek] = ep
            return True
        for pod_key, endpoint_keys in sorted(changed_pods.items()):
            self._repod(pod_key, endpoint_keys, snap)
        return False

    def _pod_changes(self, snap: Snapshot, changes: Changes | None) -> dict[PodKey, set[tuple[str, str, str, str]]]:
        """Pods whose object or endpoints changed (by identity), with their changed endpoint keys."""
        changed: dict[PodKey, set[tuple[str, str, str, str]]] = {}
        if changes is None:
            pod_keys: Iterable[PodKey] = _changed_keys(snap.pods, self._pods)
            ep_keys: Iterable[tuple[str, str, str, str]] = _changed_keys(snap.endpoints, self._eps)
        else:
            pod_keys = [
                k
                for k in cast("frozenset[PodKey]", changes.get("pods", frozenset()))
                if snap.pods.get(k) is not self._pods.get(k)
            ]
            ep_keys = [
                ek
                for ek in cast("frozenset[tuple[str, str, str, str]]", changes.get("endpoints", frozenset()))
                if snap.endpoints.get(ek) is not self._eps.get(ek)
            ]
        for k in pod_keys:
            changed.setdefault(k, set())
        for ek in ep_keys:
            changed.setdefault((ek[1], ek[2]), set()).add(ek)
        return changed

    def _repod(self, key: PodKey, endpoint_keys: set[tuple[str, str, str, str]], snap: Snapshot) -> None:
        pod = snap.pods.get(key)
        eps = self._eps_by_pod.setdefault(key, {})
        for ek in endpoint_keys:
            ep = snap.endpoints.get(ek)
            if ep is None:
                eps.pop(ek, None)
            else:
                eps[ek] = ep
        if not eps:
            del self._eps_by_pod[key]
        old = self.world.remove(key)
        new = pod_view(key, pod, eps.values())
        if new is not None:
            self.world.add(new)
        for d in self._sets.values():
            before = d.contributions(old) if old is not None else []
            after = d.contributions(new) if new is not None else []
            if before != after:
                d.discard(before)
                d.add(after)
                self._dirty_sets.add(d.name)
        for pk in self._by_ns.get(key[0], ()):
            e = self._entries[pk]
            was = key in e.compiled.selected
            now = new is not None and e.selector.matches(new.labels)
            if was != now:
                sel = set(e.compiled.selected)
                (sel.add if now else sel.discard)(key)
                e.compiled = replace(e.compiled, selected=frozenset(sel))
                self._out.policies[pk] = e.compiled
                if now:
                    self._out.selecting.setdefault(key, set()).add(pk)
                else:
                    self._out.selecting.get(key, set()).discard(pk)

    # --- policies ----------------------------------------------------------------------------------------------

    def _set_policy(self, key: tuple[str, str], pol: m.Policy | str | None) -> None:
        """Install, replace or remove a policy (a str: the reason its stored value cannot be read). The new version
        takes its set references before the old one releases its own, so a set both use is kept, not emptied and
        refilled."""
        new: _Entry | None = None
        if isinstance(pol, str):
            new = self._unreadable(key, pol)
        elif pol is not None:
            used: list[str] = []
            cp, selector, reads_ns = self._compile(pol, used)
            new = _Entry(pol, cp, selector, used, needs_ns_labels=reads_ns)
        old = self._entries.pop(key, None)
        if old is not None:
            self._ns_label_readers -= old.needs_ns_labels
            for pod in old.compiled.selected:
                self._out.selecting.get(pod, set()).discard(key)
            for name in old.sets:
                d = self._sets[name]
                d.refs -= 1
                if d.refs == 0:
                    del self._sets[name]
                    self._out.ipsets.pop(name, None)
                    self._dirty_sets.discard(name)
        if new is None:
            self._by_ns[key[0]].discard(key)
            self._out.policies.pop(key, None)
            self._out.statuses.pop(key, None)
            return
        self._entries[key] = new
        self._ns_label_readers += new.needs_ns_labels
        self._by_ns.setdefault(key[0], set()).add(key)
        for pod in new.compiled.selected:
            self._out.selecting.setdefault(pod, set()).add(key)
        self._out.policies[key] = new.compiled
        self._out.statuses[key] = PolicyStatus(key[0], key[1], new.compiled.error is None, new.compiled.error or "")

    def _unreadable(self, key: tuple[str, str], reason: str) -> _Entry:
        """A policy key whose stored value cannot be read: which pods and directions it meant is unknown, so it
        isolates every pod of its namespace both ways (the namespace's other policies still allow what they
        allow) until the value is mended or deleted. Treating it as absent could open what it isolated."""
        everything = Selector()
        selected = frozenset(self.world.select([key[0]], everything))
        error = f"stored value cannot be read ({reason}): every pod of namespace {key[0]} isolated both ways"
        cp = CompiledPolicy(key[0], key[1], (INGRESS, EGRESS), selected, error=error)
        return _Entry(reason, cp, everything)

    def _compile(self, pol: m.Policy, used: list[str]) -> tuple[CompiledPolicy, Selector, bool]:
        """The compiled policy, the selector deciding which pods it selects, and whether a namespaceSelector of
        it reads namespace labels."""
        ident = f"{pol.namespace}/{pol.name}"
        try:
            spec = parse_spec(pol.spec)
        except PolicyError as exc:
            # Unreadable selector: isolate the whole namespace rather than guess which pods it meant.
            sel = declared_selector(pol.spec) or Selector()
            broken = frozenset(self.world.select([pol.namespace], sel))
            cp = CompiledPolicy(pol.namespace, pol.name, declared_directions(pol.spec), broken, error=str(exc))
            return cp, sel, False
        selected = frozenset(self.world.select([pol.namespace], spec.pod_selector))
        compiled: dict[str, tuple[CompiledRule, ...]] = {}
        for direction in DIRECTIONS:
            rules = []
            # Rules of a direction the policy does not declare have no effect (Kubernetes ignores them).
            if direction in spec.directions:
                for i, rule in enumerate(spec.rules(direction)):
                    peers = None
                    if rule.peers is not None:
                        # Selector peers each have their own set; every ipBlock of the list shares one (their
                        # union), so a 12 000-CIDR allow-list is one set and one rule, not 12 000.
                        found = [self._peer(pol.namespace, x, used) for x in rule.peers if x.ip_block is None]
                        blocks = [x.ip_block for x in rule.peers if x.ip_block is not None]
                        if blocks:
                            found.append(self._ip_blocks(blocks, used))
                        peers = tuple(p for p in found if p is not None)
                    ports = None
                    if rule.ports is not None:
                        ports = tuple(
                            self._port(p, direction, pol.namespace, spec.pod_selector, used) for p in rule.ports
                        )
                    rules.append(CompiledRule(ident, direction, i, peers, ports))
            compiled[direction] = tuple(rules)
        cp = CompiledPolicy(pol.namespace, pol.name, spec.directions, selected, compiled[INGRESS], compiled[EGRESS])
        return cp, spec.pod_selector, _reads_namespace_labels(spec)

    def _use(self, d: _SetDef, used: list[str], fill: Iterable[str]) -> str:
        """Register a use of the set ``d`` describes, creating and filling it on first use."""
        if d.name not in self._sets:
            d.add(fill)
            self._sets[d.name] = d
            self._dirty_sets.add(d.name)
        self._sets[d.name].refs += 1
        used.append(d.name)
        return d.name

    def _pod_set(self, namespaces: list[str], sel: Selector, canonical: str, used: list[str]) -> str:
        name = names.ipset("s", canonical)
        d = _SetDef(name, "hash:ip", frozenset(namespaces), sel)
        fill = (
            ()
            if name in self._sets
            else (ip for k in self.world.select(namespaces, sel) for ip in self.world.pods[k].ips)
        )
        return self._use(d, used, fill)

    def _peer(self, policy_ns: str, peer: Peer, used: list[str]) -> PeerMatch | None:
        if peer.ip_block is not None:
            return self._ip_blocks([peer.ip_block], used)
        pods = peer.pods or Selector()
        if peer.namespaces is None:
            canonical = f"pods ns={policy_ns} sel={pods.text()}"
            text = f"pods {pods.text() or '(all)'} in namespace {policy_ns}"
            return PeerMatch(self._pod_set([policy_ns], pods, canonical, used), text)
        nss = self.world.namespaces_matching(peer.namespaces)
        canonical = f"pods nssel={peer.namespaces.text()} sel={pods.text()}"
        text = f"pods {pods.text() or '(all)'} in namespaces {peer.namespaces.text() or '(all)'}"
        return PeerMatch(self._pod_set(nss, pods, canonical, used), text)

    def _ip_blocks(self, blocks: list[IpBlock], used: list[str]) -> PeerMatch | None:
        """One hash:net set holding exactly the addresses any of ``blocks`` admits (each block's CIDR minus its
        excepts, the union collapsed). No ``nomatch`` entries: with several blocks a nomatch of one would shadow
        an overlapping block that admits the address."""
        v4 = [b for b in blocks if b.version == 4]
        if not v4:
            return None  # IPv4 dataplane: IPv6 blocks match no packet it sees
        members = _block_members(v4)
        if len(v4) == 1:
            canonical = f"ipblock {v4[0].cidr} except {','.join(v4[0].excepts)}"
        else:
            canonical = f"ipblocks {' '.join(members)}"
        texts = [b.cidr + (f" except {', '.join(b.excepts)}" if b.excepts else "") for b in v4]
        text = f"ipBlock {texts[0]}" if len(texts) == 1 else f"ipBlocks {'; '.join(texts[:3])}"
        if len(texts) > 3:
            text += f"; … ({len(texts)} in all)"
        name = self._use(_SetDef(names.ipset("b", canonical), "hash:net"), used, members)
        return PeerMatch(name, text)

    def _port(self, port: Port, direction: str, policy_ns: str, selector: Selector, used: list[str]) -> PortMatch:
        if not isinstance(port.port, str):
            return PortMatch(port.protocol, port.port, port.end_port, text=port.text())
        # A named port is resolved on the destination: for ingress the policy's own pods, for egress any pod.
        if direction == INGRESS:
            canonical = f"named {port.port}/{port.protocol} ns={policy_ns} sel={selector.text()}"
            d = _SetDef(names.ipset("n", canonical), "hash:ip,port", frozenset([policy_ns]), selector)
        else:
            canonical = f"named {port.port}/{port.protocol} any"
            d = _SetDef(names.ipset("n", canonical), "hash:ip,port")
        d.port_name, d.protocol = port.port, port.protocol
        fill: list[str] = []
        if d.name not in self._sets:
            pods = (
                self.world.select([policy_ns], selector)
                if direction == INGRESS
                else self.world.with_port_name(port.port)
            )
            fill = [x for k in pods for x in d.contributions(self.world.pods[k])]
        return PortMatch(port.protocol, named_set=self._use(d, used, fill), text=port.text())


Span = tuple[int, int]  # first and last IPv4 address, as integers


def _block_members(blocks: list[IpBlock]) -> list[str]:
    """hash:net members admitting exactly the union of ``blocks`` (each: its CIDR minus its excepts).

    The kernel takes the most specific entry containing an address, and ``nomatch`` entries say "not in the set".
    A block's excepts can be ``nomatch`` entries (few entries, few prefix lengths to probe per packet) when no other
    block overlaps it: otherwise a nomatch could hide an address the other block admits, and the exact union is
    written out instead. hash:net cannot hold a /0: it becomes its two /1 halves. Integer arithmetic: a 12 000-CIDR
    allow-list takes milliseconds."""
    spans = [_span(b.cidr) for b in blocks]
    fenced = [i for i, b in enumerate(blocks) if b.excepts]
    if not fenced:
        return _cidrs(_merge(spans))

    def exact() -> list[str]:
        return _cidrs(_merge([sp for i, b in enumerate(blocks) for sp in _minus(spans[i], b.excepts)]))

    overlapping = _overlapping(spans)
    if any(i in overlapping for i in fenced):
        return exact()
    out = _cidrs(_merge([sp for i, sp in enumerate(spans) if not blocks[i].excepts]))
    for i in fenced:
        positive = _cidrs([spans[i]])
        cuts = _cidrs(_merge([_span(e) for e in blocks[i].excepts]))
        if set(cuts) & set(positive):  # a /0 minus a /1: the nomatch would collide with a positive half
            return exact()
        out += positive + [f"{c} nomatch" for c in cuts]
    return out


def _span(cidr: str) -> Span:
    parsed = ipv4_span(cidr)
    if parsed is None:  # validated CIDRs always parse; stay correct regardless
        net = ipaddress.IPv4Network(cidr, strict=False)
        return int(net.network_address), int(net.broadcast_address)
    addr, plen = parsed
    return addr, addr + (1 << (32 - plen)) - 1


def _merge(spans: list[Span]) -> list[Span]:
    """The union of ``spans`` as disjoint, non-adjacent spans, in order."""
    out: list[Span] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1] + 1:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def _cidrs(spans: list[Span]) -> list[str]:
    """The fewest CIDRs covering exactly ``spans`` (largest aligned block at each step; never a /0)."""
    out = []
    for first, end in spans:
        at = first
        while at <= end:
            size = at & -at if at else 1 << 32
            while size > end - at + 1:
                size >>= 1
            size = min(size, 1 << 31)
            out.append(ipv4_text(at, 32 - size.bit_length() + 1))
            at += size
    return out


def _minus(span: Span, excepts: tuple[str, ...]) -> list[Span]:
    parts = [span]
    for cut_start, cut_end in _merge([_span(e) for e in excepts]):
        nxt = []
        for start, end in parts:
            if cut_end < start or cut_start > end:
                nxt.append((start, end))
                continue
            if start < cut_start:
                nxt.append((start, cut_start - 1))
            if cut_end < end:
                nxt.append((cut_end + 1, end))
        parts = nxt
    return parts


def _overlapping(spans: list[Span]) -> set[int]:
    """Indexes of the spans that overlap another one: one sort and one sweep."""
    order = sorted(range(len(spans)), key=lambda i: spans[i])
    out: set[int] = set()
    reach = -1  # the highest address covered by the spans before
    for p, i in enumerate(order):
        start, end = spans[i]
        if start <= reach or (p + 1 < len(order) and spans[order[p + 1]][0] <= end):
            out.add(i)
        reach = max(reach, end)
    return out


def _reads_namespace_labels(spec: PolicySpec) -> bool:
    """Whether a namespaceSelector of ``spec`` reads labels a namespace record carries (the name label is
    implied)."""
    return any(
        peer.namespaces is not None and any(r.key != NAME_LABEL for r in peer.namespaces.requirements)
        for direction in spec.directions
        for rule in spec.rules(direction)
        for peer in rule.peers or ()
    )


def compile_policies(snap: Snapshot) -> Compiled:
    """A fresh compile (what ``agentctl`` uses; the agent keeps a ``PolicyCompiler`` across snapshots)."""
    return PolicyCompiler().update(snap)


__all__ = [
    "EGRESS",
    "INGRESS",
    "Compiled",
    "CompiledPolicy",
    "CompiledRule",
    "PolicyCompiler",
    "PolicyStatus",
    "compile_policies",
]
