"""Compiled policies + this node's endpoints → the filter-table chains, ipsets and kernel jumps (``DataplaneState``).

Layout (docs/policy.md draws it):

    FORWARD -> podnet-FORWARD: -i cali+ / -o cali+ RELATED,ESTABLISHED accept; -i cali+ / -o cali+ -> podnet-fwd-pod
        podnet-fwd-pod: INVALID drop; from a pod: podnet-from-pod (its egress); to a pod: podnet-to-pod (its
                        ingress); accept
    INPUT   -> podnet-INPUT:   -i cali+ -> podnet-in-pod: conntrack; known interface accept (pod to its own node);
                               an unknown cali interface is dropped
    OUTPUT  -> podnet-OUTPUT:  -o cali+ accept (this node to its pods: always allowed)

``podnet-from-pod``, ``podnet-to-pod`` and ``podnet-host-pod`` dispatch on the interface name through a tree of
chains keyed by name prefix (at most LEAF rules per chain), so a packet meets O(log n) rules, not one per endpoint;
a ``cali`` name without chains falls through to DROP. The per-endpoint chains (``podnet-fw-<iface>`` for what the
pod sends, ``podnet-tw-<iface>`` for what it receives) call each selecting policy's chain; a policy chain sets the
ACCEPT_MARK bit on a match and returns, the endpoint chain returns on the bit (allowed: the other direction is
evaluated next on the same node) and drops otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

from agent.calc.policy import names
from agent.calc.policy.resolve import Compiled, CompiledPolicy, CompiledRule, PeerMatch, PortMatch
from agent.calc.policy.spec import EGRESS, INGRESS
from agent.calc.snapshot import Snapshot
from agent.calc.state import Chain, DataplaneState, IpSet, KernelJump

TABLE = "filter"
ACCEPT_MARK = "0x10000"
MARK_SET = f"-j MARK --set-xmark {ACCEPT_MARK}/{ACCEPT_MARK}"
MARK_CLEAR = f"-j MARK --set-xmark 0x0/{ACCEPT_MARK}"
ON_MARK = f"-m mark --mark {ACCEPT_MARK}/{ACCEPT_MARK}"
LEAF = 16  # interface rules per dispatch chain before it splits by the next character
IFACE_PREFIX = "cali"
_IFNAME = re.compile(r"^cali[A-Za-z0-9_.-]{1,11}$")  # Linux: at most 15 characters

FORWARD, INPUT, OUTPUT = "podnet-FORWARD", "podnet-INPUT", "podnet-OUTPUT"
FWD_POD, IN_POD = "podnet-fwd-pod", "podnet-in-pod"
FROM_POD, TO_POD, HOST_POD = "podnet-from-pod", "podnet-to-pod", "podnet-host-pod"


def comment(text: str) -> str:
    return f'-m comment --comment "{text}"'


def policy_chain(ident: str, direction: str) -> str:
    return names.chain("pi" if direction == INGRESS else "pe", names.digest(ident, 16))


def endpoint_chain(iface: str, direction: str) -> str:
    # "fw": from the workload (its egress); "tw": to the workload (its ingress)
    return names.chain("fw" if direction == EGRESS else "tw", iface)


def _peer_text(peer: PeerMatch | None, direction: str) -> str:
    if peer is None:
        return ""
    return f"-m set --match-set {peer.set_name} {'src' if direction == INGRESS else 'dst'} "


def _port_text(port: PortMatch | None) -> str:
    if port is None:
        return ""
    proto = port.protocol.lower()
    if port.named_set is not None:
        return f"-p {proto} -m set --match-set {port.named_set} dst,dst "
    if port.port is None:
        return f"-p {proto} "
    rng = f"{port.port}:{port.end_port}" if port.end_port not in (None, port.port) else str(port.port)
    return f"-p {proto} -m {proto} --dport {rng} "


def _rule_lines(rule: CompiledRule) -> list[str]:
    peers: Iterable[PeerMatch | None] = (None,) if rule.peers is None else rule.peers
    ports: list[PortMatch | None] = [None] if rule.ports is None else list(rule.ports)
    lines = [
        f"{_port_text(port)}{_peer_text(peer, rule.direction)}{comment(rule.label)} {MARK_SET}"
        for peer in peers
        for port in ports
    ]
    if lines:
        lines.append(f"{ON_MARK} -j RETURN")
    return lines


def policy_chains(cp: CompiledPolicy, refused: bool = False) -> list[Chain]:
    """The chains of one policy; a rejected (or kernel-refused) one allows nothing: its pods stay isolated."""
    out = []
    for direction in cp.directions:
        rules = [line for r in cp.rules(direction) for line in _rule_lines(r)]
        if cp.error is not None or refused:
            rules = [f"{comment(f'{cp.ident} rejected: allows nothing')} -j RETURN"]
        out.append(Chain(policy_chain(cp.ident, direction), tuple(rules)))
    return out


def _endpoint_chain(name: str, pols: list[CompiledPolicy], direction: str) -> Chain:
    if not pols:
        return Chain(name, (f"{comment(f'no {direction.lower()} policy: unrestricted')} -j RETURN",))
    rules = [MARK_CLEAR]
    for cp in pols:
        rules += [f"-j {policy_chain(cp.ident, direction)}", f"{ON_MARK} -j RETURN"]
    rules.append(f"{comment(f'{direction.lower()} isolated: no rule allowed it')} -j DROP")
    return Chain(name, tuple(rules))


def _pending_chain(name: str, why: str) -> Chain:
    """An endpoint the agent cannot give verdicts for yet (its pod or namespace record is missing): fail closed."""
    short = why.split(":", 1)[0]
    return Chain(name, (f"{comment(short)} -j DROP",))


def dispatch_tree(root: str, kind: str, flag: str, ifaces: list[str], target: Callable[[str], str]) -> list[Chain]:
    """Chains matching ``flag`` (``-i``/``-o``) against ``ifaces``: ``root`` holds at most LEAF interface rules or
    jumps to sub-chains per next character of the name; whatever matches nothing is an unknown interface: DROP."""
    chains: list[Chain] = []

    def build(name: str, prefix: str, group: list[str]) -> None:
        rules = []
        if len(group) <= LEAF:
            rules = [f"{flag} {i} {target(i)}" for i in group]
        else:
            rules = [f"{flag} {i} {target(i)}" for i in group if len(i) == len(prefix)]
            by_next: dict[str, list[str]] = {}
            for i in group:
                if len(i) > len(prefix):
                    by_next.setdefault(i[len(prefix)], []).append(i)
            for ch, sub in sorted(by_next.items()):
                sub_name = names.chain(kind, prefix[len(IFACE_PREFIX) :] + ch)
                rules.append(f"{flag} {prefix}{ch}+ -g {sub_name}")
                build(sub_name, prefix + ch, sub)
        rules.append(f"{comment('unknown endpoint interface')} -j DROP")
        chains.append(Chain(name, tuple(rules)))

    build(root, IFACE_PREFIX, sorted(ifaces))
    return chains


def build_state(c: Compiled, snap: Snapshot, node: str, refused: Mapping[str, str] | None = None) -> DataplaneState:
    """The desired filter table and ipsets for ``node``: only the policies and sets its endpoints need.
    ``refused``: policy idents whose rules the kernel would not take (they allow nothing).

    Chains are rendered once per compiled object and reused from ``c.memo`` while that object is unchanged (the
    compiler replaces a policy's or a selection's object when it changes), so a change re-renders what it touched,
    not every local endpoint's and policy's chains."""
    refused = refused or {}
    memo = c.memo
    endpoints = [ep for ep in snap.local_endpoints(node) if _IFNAME.match(ep.host_iface)]
    chains: dict[str, Chain] = {}
    used_policies: dict[str, CompiledPolicy] = {}
    for ep in endpoints:
        pod = (ep.namespace, ep.pod)
        pending = c.world.pending(pod)
        for direction in (EGRESS, INGRESS):
            pols = () if pending is not None else tuple(c.policies_for(pod, direction))
            used_policies.update((p.ident, p) for p in pols)
            key = ("endpoint", ep.host_iface, direction)
            hit = memo.get(key)
            if hit is not None and hit[0] == pending and hit[1] == pols:
                ch = hit[2]
            else:
                name = endpoint_chain(ep.host_iface, direction)
                ch = (
                    _pending_chain(name, pending)
                    if pending is not None
                    else _endpoint_chain(name, list(pols), direction)
                )
                memo[key] = (pending, pols, ch)
            chains[ch.name] = ch
    used_sets: set[str] = set()
    for cp in used_policies.values():
        is_refused = cp.ident in refused
        hit = memo.get(("policy", cp.ident))
        if hit is not None and hit[0] is cp and hit[1] == is_refused:
            rendered, sets = hit[2], hit[3]
        else:
            rendered = policy_chains(cp, is_refused)
            sets = frozenset() if is_refused else _sets_of(cp)
            memo[("policy", cp.ident)] = (cp, is_refused, rendered, sets)
        for ch in rendered:
            chains[ch.name] = ch
        used_sets |= sets
    ifaces = tuple(sorted({ep.host_iface for ep in endpoints}))
    hit = memo.get(("dispatch",))
    if hit is not None and hit[0] == ifaces:
        fixed = hit[1]
    else:
        fixed = [
            *dispatch_tree(FROM_POD, "fp", "-i", list(ifaces), lambda i: f"-g {endpoint_chain(i, EGRESS)}"),
            *dispatch_tree(TO_POD, "tp", "-o", list(ifaces), lambda i: f"-g {endpoint_chain(i, INGRESS)}"),
            *dispatch_tree(HOST_POD, "hp", "-i", list(ifaces), lambda _: f"{comment('pod to its own node')} -j ACCEPT"),
            *_top_chains(),
        ]
        memo[("dispatch",)] = (ifaces, fixed)
    for ch in fixed:
        chains[ch.name] = ch
    live = 2 * len(endpoints) + len(used_policies) + 1
    if len(memo) > 2 * live + 64:  # objects gone since they were rendered: forget them (amortised O(1) per build)
        keep: set[tuple[str, ...]] = {("endpoint", ep.host_iface, d) for ep in endpoints for d in (EGRESS, INGRESS)}
        keep |= {("policy", ident) for ident in used_policies} | {("dispatch",)}
        for stale in [key for key in memo if key not in keep]:
            del memo[stale]
    ipsets: dict[str, IpSet] = {name: c.ipsets[name] for name in sorted(used_sets)}
    jumps = tuple(
        KernelJump(TABLE, builtin, f"-j {ours}")
        for builtin, ours in (("FORWARD", FORWARD), ("INPUT", INPUT), ("OUTPUT", OUTPUT))
    )
    return DataplaneState(ipsets=ipsets, tables={TABLE: dict(sorted(chains.items()))}, jumps=jumps)


def _sets_of(cp: CompiledPolicy) -> frozenset[str]:
    out: set[str] = set()
    for direction in cp.directions:
        for rule in cp.rules(direction):
            out.update(p.set_name for p in rule.peers or ())
            out.update(p.named_set for p in rule.ports or () if p.named_set)
    return frozenset(out)


def _top_chains() -> list[Chain]:
    established = "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    invalid = "-m conntrack --ctstate INVALID -j DROP"
    conntrack = (established, invalid)
    pods = f"{IFACE_PREFIX}+"
    # The chains every packet of a pod crosses carry no comments (hashed=False; their text is iptables-save's own
    # form): with iptables-nft each comment is a match evaluated per packet. Most forwarded packets belong to
    # established flows: those of pod interfaces are accepted one rule into our chain.
    return [
        Chain(
            FORWARD,
            (
                f"-i {pods} {established}",
                f"-o {pods} {established}",
                f"-i {pods} -j {FWD_POD}",
                f"-o {pods} -j {FWD_POD}",
            ),
            hashed=False,
        ),
        Chain(FWD_POD, (invalid, f"-i {pods} -j {FROM_POD}", f"-o {pods} -j {TO_POD}", "-j ACCEPT")),
        Chain(INPUT, (f"-i {pods} -j {IN_POD}",), hashed=False),
        Chain(IN_POD, (*conntrack, f"-j {HOST_POD}"), hashed=False),
        Chain(OUTPUT, (f"-o {pods} -j ACCEPT",), hashed=False),  # this node to its pods: always allowed
    ]
