"""Policies → the node-independent intermediate form both the kernel rules and ``explain`` are made from.

Each peer becomes an ipset (pod IPs of a selector, or an ipBlock as hash:net with ``nomatch`` excepts); each named
port becomes a hash:ip,port set of the pods that carry that name. A rule is then "peer set x port match", so the
number of rules a packet meets depends on the policies selecting its pod, never on how many pods a selector picks.

An invalid policy is reported and compiled with no rules in the directions it declares, for the pods it selects
(its whole namespace when even its pod selector is unreadable): broken input isolates, it never opens.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from agent.calc.policy import names
from agent.calc.policy.selector import Selector
from agent.calc.policy.spec import (
    DIRECTIONS,
    EGRESS,
    INGRESS,
    IpBlock,
    Peer,
    PolicyError,
    Port,
    declared_directions,
    declared_selector,
    parse_spec,
)
from agent.calc.policy.world import PodKey, World
from agent.calc.snapshot import Snapshot
from agent.calc.state import IpSet
from datastore import model as m


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
    world: World
    policies: dict[tuple[str, str], CompiledPolicy] = field(default_factory=dict)
    ipsets: dict[str, IpSet] = field(default_factory=dict)
    statuses: dict[tuple[str, str], PolicyStatus] = field(default_factory=dict)
    # pod -> direction -> the policies (keys, sorted) that select it in that direction
    selecting: dict[PodKey, dict[str, list[tuple[str, str]]]] = field(default_factory=dict)

    def policies_for(self, pod: PodKey, direction: str) -> list[CompiledPolicy]:
        return [self.policies[k] for k in self.selecting.get(pod, {}).get(direction, [])]


class _Resolver:
    def __init__(self, world: World) -> None:
        self.world = world
        self.ipsets: dict[str, IpSet] = {}

    def _add(self, kind: str, set_type: str, canonical: str, members: Iterable[str]) -> str:
        name = names.ipset(kind, canonical)
        if name not in self.ipsets:
            self.ipsets[name] = IpSet(name, set_type, frozenset(members))
        return name

    def pod_set(self, namespaces: Iterable[str], sel: Selector, canonical: str) -> str:
        name = names.ipset("s", canonical)
        if name in self.ipsets:
            return name
        pods = self.world.select(namespaces, sel)
        return self._add("s", "hash:ip", canonical, (ip for k in pods for ip in self.world.pods[k].ips))

    def peer(self, policy_ns: str, peer: Peer) -> PeerMatch | None:
        if peer.ip_block is not None:
            return self.ip_block(peer.ip_block)
        pods = peer.pods or Selector()
        if peer.namespaces is None:
            canonical = f"pods ns={policy_ns} sel={pods.text()}"
            text = f"pods {pods.text() or '(all)'} in namespace {policy_ns}"
            return PeerMatch(self.pod_set([policy_ns], pods, canonical), text)
        nss = self.world.namespaces_matching(peer.namespaces)
        canonical = f"pods nssel={peer.namespaces.text()} sel={pods.text()}"
        text = f"pods {pods.text() or '(all)'} in namespaces {peer.namespaces.text() or '(all)'}"
        return PeerMatch(self.pod_set(nss, pods, canonical), text)

    def ip_block(self, block: IpBlock) -> PeerMatch | None:
        if block.version != 4:
            return None  # IPv4 dataplane: an IPv6 block matches no packet it sees
        net = ipaddress.ip_network(block.cidr)
        # ipset's hash:net cannot hold a /0: two /1 halves cover the same space.
        nets = [str(n) for n in net.subnets(new_prefix=1)] if net.prefixlen == 0 else [str(net)]
        members = [*nets, *(f"{e} nomatch" for e in block.excepts)]
        canonical = f"ipblock {block.cidr} except {','.join(block.excepts)}"
        text = f"ipBlock {block.cidr}" + (f" except {', '.join(block.excepts)}" if block.excepts else "")
        return PeerMatch(self._add("b", "hash:net", canonical, members), text)

    def port(self, port: Port, direction: str, policy_ns: str, selector: Selector) -> PortMatch:
        if not isinstance(port.port, str):
            return PortMatch(port.protocol, port.port, port.end_port, text=port.text())
        # A named port is resolved on the destination: for ingress the policy's own pods, for egress any pod.
        if direction == INGRESS:
            canonical = f"named {port.port}/{port.protocol} ns={policy_ns} sel={selector.text()}"
            pods = self.world.select([policy_ns], selector)
        else:
            canonical = f"named {port.port}/{port.protocol} any"
            pods = self.world.with_port_name(port.port)
        members = []
        for k in pods:
            view = self.world.pods[k]
            number = view.named_port(port.port, port.protocol)
            if number is not None:
                members += [f"{ip},{port.protocol.lower()}:{number}" for ip in view.ips]
        name = self._add("n", "hash:ip,port", canonical, members)
        return PortMatch(port.protocol, named_set=name, text=port.text())


def compile_policies(snap: Snapshot) -> Compiled:
    world = World.from_snapshot(snap)
    res = _Resolver(world)
    out = Compiled(world)
    for key in sorted(snap.policies):
        pol = snap.policies[key]
        cp = _compile_one(res, pol)
        out.policies[key] = cp
        out.statuses[key] = PolicyStatus(pol.namespace, pol.name, cp.error is None, cp.error or "")
        for pod in sorted(cp.selected):
            per = out.selecting.setdefault(pod, {})
            for d in cp.directions:
                per.setdefault(d, []).append(key)
    out.ipsets = res.ipsets
    return out


def _compile_one(res: _Resolver, pol: m.Policy) -> CompiledPolicy:
    ident = f"{pol.namespace}/{pol.name}"
    try:
        spec = parse_spec(pol.spec)
    except PolicyError as exc:
        # Unreadable selector: isolate the whole namespace rather than guess which pods it meant.
        sel = declared_selector(pol.spec) or Selector()
        broken = frozenset(res.world.select([pol.namespace], sel))
        return CompiledPolicy(pol.namespace, pol.name, declared_directions(pol.spec), broken, error=str(exc))
    selected = frozenset(res.world.select([pol.namespace], spec.pod_selector))
    compiled: dict[str, tuple[CompiledRule, ...]] = {}
    for direction in DIRECTIONS:
        rules = []
        # Rules of a direction the policy does not declare have no effect (Kubernetes ignores them).
        if direction in spec.directions:
            for i, rule in enumerate(spec.rules(direction)):
                peers = None
                if rule.peers is not None:
                    peers = tuple(p for p in (res.peer(pol.namespace, x) for x in rule.peers) if p is not None)
                ports = None
                if rule.ports is not None:
                    ports = tuple(res.port(p, direction, pol.namespace, spec.pod_selector) for p in rule.ports)
                rules.append(CompiledRule(ident, direction, i, peers, ports))
        compiled[direction] = tuple(rules)
    return CompiledPolicy(pol.namespace, pol.name, spec.directions, selected, compiled[INGRESS], compiled[EGRESS])


__all__ = ["EGRESS", "INGRESS", "Compiled", "CompiledPolicy", "CompiledRule", "PolicyStatus", "compile_policies"]
