"""Is a connection allowed, and why: evaluated over the same compiled rules and ipset members the kernel gets.

A connection from a pod needs its pod's egress to allow it (or no policy isolating that pod for egress), and a
connection to a pod needs that pod's ingress to allow it, wherever the two pods run. Traffic between a pod and its
own node is always allowed, both ways (as the Kubernetes documentation says).
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field

from agent.calc.policy.resolve import Compiled, CompiledRule, PortMatch
from agent.calc.policy.spec import EGRESS, INGRESS
from agent.calc.policy.world import PodKey
from agent.calc.state import IpSet


class ExplainError(ValueError):
    """The question cannot be answered (unknown pod, pod without an IPv4 address, bad port)."""


@dataclass(frozen=True)
class Side:
    """One end of a connection: a pod, or a bare address (an outside host or a node)."""

    pod: PodKey | None
    ip: str

    @property
    def text(self) -> str:
        return f"{self.pod[0]}/{self.pod[1]}" if self.pod else self.ip


@dataclass(frozen=True)
class DirectionResult:
    direction: str
    allowed: bool
    isolated: bool  # some policy selects the pod in this direction
    policies: tuple[str, ...]  # the policies selecting the pod in this direction ("ns/name")
    matched: tuple[str, ...]  # the rules that allow it ("ns/name ingress rule 0")
    rejected: tuple[str, ...] = ()  # selecting policies that were rejected (they allow nothing)
    pending: str | None = None  # the pod gets no traffic yet, and why (its pod or namespace record is missing)

    def to_json(self) -> dict[str, object]:
        return {
            "direction": self.direction,
            "allowed": self.allowed,
            "isolated": self.isolated,
            "policies": list(self.policies),
            "matched": list(self.matched),
            "rejected": list(self.rejected),
            "pending": self.pending,
        }


@dataclass(frozen=True)
class Verdict:
    src: Side
    dst: Side
    protocol: str
    port: int
    allowed: bool
    reason: str
    egress: DirectionResult | None = None
    ingress: DirectionResult | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "from": self.src.text,
            "to": self.dst.text,
            "protocol": self.protocol,
            "port": self.port,
            "allowed": self.allowed,
            "reason": self.reason,
            "egress": self.egress.to_json() if self.egress else None,
            "ingress": self.ingress.to_json() if self.ingress else None,
        }


def set_contains(ipset: IpSet, ip: str, protocol: str, port: int) -> bool:
    """Membership as the kernel decides it: exact for hash:ip and hash:ip,port; for hash:net the most specific
    containing entry wins, and an entry marked ``nomatch`` means "not in the set"."""
    if ipset.type == "hash:ip":
        return ip in ipset.members
    if ipset.type == "hash:ip,port":
        return f"{ip},{protocol.lower()}:{port}" in ipset.members
    addr = ipaddress.ip_address(ip)
    best: tuple[int, bool] | None = None
    for member in ipset.members:
        net_text, _, flag = member.partition(" ")
        net = ipaddress.ip_network(net_text, strict=False)
        if addr in net and (best is None or net.prefixlen > best[0]):
            best = (net.prefixlen, flag != "nomatch")
    return best is not None and best[1]


def _port_matches(c: Compiled, pm: PortMatch, dst_ip: str, protocol: str, port: int) -> bool:
    if pm.protocol != protocol:
        return False
    if pm.named_set is not None:
        return set_contains(c.ipsets[pm.named_set], dst_ip, protocol, port)
    if pm.port is None:
        return True
    return pm.port <= port <= (pm.end_port if pm.end_port is not None else pm.port)


@dataclass(frozen=True)
class Packet:
    """What a rule looks at: the peer's address (source for ingress, destination for egress), the destination
    address (named ports are resolved on it), protocol and destination port."""

    peer_ip: str
    dst_ip: str
    protocol: str
    port: int


def rule_matches(c: Compiled, rule: CompiledRule, pkt: Packet) -> bool:
    if rule.peers is not None and not any(
        set_contains(c.ipsets[p.set_name], pkt.peer_ip, pkt.protocol, pkt.port) for p in rule.peers
    ):
        return False
    return rule.ports is None or any(_port_matches(c, pm, pkt.dst_ip, pkt.protocol, pkt.port) for pm in rule.ports)


def _direction(c: Compiled, pod: PodKey, direction: str, pkt: Packet) -> DirectionResult:
    pending = c.world.pending(pod)
    if pending is not None:
        return DirectionResult(direction, False, True, (), (), pending=pending)
    pols = c.policies_for(pod, direction)
    if not pols:
        return DirectionResult(direction, True, False, (), ())
    matched = tuple(r.label for p in pols for r in p.rules(direction) if rule_matches(c, r, pkt))
    rejected = tuple(p.ident for p in pols if p.error is not None)
    return DirectionResult(direction, bool(matched), True, tuple(p.ident for p in pols), matched, rejected)


def resolve_side(c: Compiled, text: str) -> Side:
    """``NS/POD`` (its first IPv4 address) or a bare IPv4 address."""
    if "/" in text:
        ns, _, name = text.partition("/")
        view = c.world.pods.get((ns, name))
        if view is None:
            raise ExplainError(f"no pod {text}")
        if not view.ips:
            raise ExplainError(f"pod {text} has no IPv4 address yet")
        return Side(view.key, view.ips[0])
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ExplainError(f"{text!r} is neither NAMESPACE/POD nor an IP address") from None
    if ip.version != 4:
        raise ExplainError(f"{text}: only IPv4 is enforced")
    for view in c.world.pods.values():
        if str(ip) in view.ips:
            return Side(view.key, str(ip))
    return Side(None, str(ip))


def parse_port(text: str) -> tuple[int, str]:
    """``80``, ``80/TCP``, ``53/udp`` → (port, protocol)."""
    num, _, proto = text.partition("/")
    proto = (proto or "TCP").upper()
    if proto not in ("TCP", "UDP", "SCTP"):
        raise ExplainError(f"{text!r}: protocol must be TCP, UDP or SCTP")
    if not num.isdigit() or not 1 <= int(num) <= 65535:
        raise ExplainError(f"{text!r}: port must be a number 1-65535")
    return int(num), proto


def explain(c: Compiled, src: Side, dst: Side, protocol: str, port: int) -> Verdict:
    if src.pod is not None and src.pod == dst.pod:
        return Verdict(src, dst, protocol, port, True, "a pod reaching itself never leaves its network namespace")
    if src.pod is not None and dst.pod is None:
        src_node = c.world.pods[src.pod].node
        if src_node is not None and dst.ip in c.world.node_addresses.get(src_node, ()):
            return Verdict(src, dst, protocol, port, True, f"to the pod's own node {src_node}: always allowed")
    if dst.pod is not None:
        dst_node = c.world.pods[dst.pod].node
        if src.pod is None and dst_node is not None and src.ip in c.world.node_addresses.get(dst_node, ()):
            return Verdict(src, dst, protocol, port, True, f"from the pod's own node {dst_node}: always allowed")
    egress = _direction(c, src.pod, EGRESS, Packet(dst.ip, dst.ip, protocol, port)) if src.pod else None
    ingress = _direction(c, dst.pod, INGRESS, Packet(src.ip, dst.ip, protocol, port)) if dst.pod else None
    denied = [d for d in (egress, ingress) if d is not None and not d.allowed]
    if not denied:
        parts = [
            f"{d.direction.lower()} {'allowed by ' + ', '.join(d.matched) if d.isolated else 'not isolated'}"
            for d in (egress, ingress)
            if d is not None
        ]
        return Verdict(src, dst, protocol, port, True, "; ".join(parts) or "no pod involved", egress, ingress)
    reasons = []
    for d in denied:
        who = src.text if d.direction == EGRESS else dst.text
        if d.pending is not None:
            reasons.append(f"{d.direction.lower()} of {who}: {d.pending}")
            continue
        why = f"{d.direction.lower()} of {who} is isolated by {', '.join(d.policies)} and no rule allows it"
        if d.rejected:
            why += f" (rejected, allowing nothing: {', '.join(d.rejected)})"
        reasons.append(why)
    return Verdict(src, dst, protocol, port, False, "; ".join(reasons), egress, ingress)


@dataclass(frozen=True)
class Matrix:
    pods: tuple[PodKey, ...]
    protocol: str
    port: int
    allowed: dict[tuple[PodKey, PodKey], bool]
    hosts: tuple[str, ...] = ()  # bare addresses (outside hosts) shown as sources and destinations too
    host_allowed: dict[tuple[str, str], bool] = field(default_factory=dict)  # (source, destination) texts

    def names(self) -> list[str]:
        return [f"{ns}/{name}" for ns, name in self.pods] + list(self.hosts)

    @functools.cached_property
    def _pod_keys(self) -> dict[str, PodKey]:
        return {f"{ns}/{name}": (ns, name) for ns, name in self.pods}

    def reaches(self, src: str, dst: str) -> bool | None:
        """By the names ``names()`` gives; None for a participant to itself or between two hosts."""
        if (src, dst) in self.host_allowed:
            return self.host_allowed[(src, dst)]
        key = self._pod_keys
        if src in key and dst in key and src != dst:
            return self.allowed[(key[src], key[dst])]
        return None

    def to_json(self) -> dict[str, object]:
        names = self.names()
        table: dict[str, dict[str, bool]] = {}
        for src in names:
            row = {dst: ok for dst in names if (ok := self.reaches(src, dst)) is not None}
            if row:
                table[src] = row
        return {
            "protocol": self.protocol,
            "port": self.port,
            "pods": names[: len(self.pods)],
            "hosts": list(self.hosts),
            "allowed": table,
        }


def matrix(c: Compiled, protocol: str, port: int, namespace: str | None = None, hosts: tuple[str, ...] = ()) -> Matrix:
    """Reachability between every pair of pods that have an IPv4 address (a pod to itself is not shown), and
    between each pod and each of ``hosts`` (bare addresses, e.g. an outside host) both ways."""
    pods = tuple(k for k, v in sorted(c.world.pods.items()) if v.ips and (namespace is None or k[0] == namespace))
    sides = {k: Side(k, c.world.pods[k].ips[0]) for k in pods}
    allowed = {(s, d): explain(c, sides[s], sides[d], protocol, port).allowed for s in pods for d in pods if s != d}
    host_allowed: dict[tuple[str, str], bool] = {}
    for ip in hosts:
        host = Side(None, ip)
        for k in pods:
            host_allowed[(ip, sides[k].text)] = explain(c, host, sides[k], protocol, port).allowed
            host_allowed[(sides[k].text, ip)] = explain(c, sides[k], host, protocol, port).allowed
    return Matrix(pods, protocol, port, allowed, tuple(hosts), host_allowed)


__all__ = ["INGRESS", "DirectionResult", "ExplainError", "Matrix", "Side", "Verdict", "explain", "matrix"]
