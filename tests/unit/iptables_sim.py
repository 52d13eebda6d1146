"""A small model of netfilter's filter-table traversal, for the rule forms the policy compiler writes: enough to
follow a new connection's first packet through a ``DataplaneState`` and count the rules it meets. Unknown matches
raise, so the model cannot silently diverge from what the compiler emits."""

from __future__ import annotations

import functools
import ipaddress
import shlex
from dataclasses import dataclass, field

from agent.calc.state import DataplaneState, IpSet


@dataclass
class Packet:
    src: str
    dst: str
    proto: str  # tcp | udp | sctp
    dport: int
    iif: str = ""  # input interface ("" for locally generated)
    oif: str = ""  # output interface ("" for locally delivered)
    mark: int = 0
    rules_seen: int = 0
    trace: list[str] = field(default_factory=list)


def in_set(s: IpSet, ip: str, proto: str, port: int) -> bool:
    if s.type == "hash:ip":
        return ip in s.members
    if s.type == "hash:ip,port":
        return f"{ip},{proto}:{port}" in s.members
    addr = ipaddress.ip_address(ip)
    best: tuple[int, bool] | None = None
    for member in s.members:
        net_text, _, flag = member.partition(" ")
        net = ipaddress.ip_network(net_text)
        if addr in net and (best is None or net.prefixlen > best[0]):
            best = (net.prefixlen, flag != "nomatch")
    return best is not None and best[1]


def _iface(pattern: str, name: str) -> bool:
    return name.startswith(pattern[:-1]) if pattern.endswith("+") else name == pattern


def _matches(state: DataplaneState, args: list[str], pkt: Packet) -> bool:
    i = 0
    while i < len(args):
        a = args[i]
        if a == "-i":
            if not _iface(args[i + 1], pkt.iif):
                return False
            i += 2
        elif a == "-o":
            if not _iface(args[i + 1], pkt.oif):
                return False
            i += 2
        elif a == "-p":
            if args[i + 1] != pkt.proto:
                return False
            i += 2
        elif a == "-m" and args[i + 1] in ("tcp", "udp", "sctp"):
            i += 2
        elif a == "--dport":
            lo, _, hi = args[i + 1].partition(":")
            if not int(lo) <= pkt.dport <= int(hi or lo):
                return False
            i += 2
        elif a == "-m" and args[i + 1] == "conntrack":
            assert args[i + 2] == "--ctstate"
            if "NEW" not in args[i + 3].split(","):
                return False  # a new connection's first packet is neither ESTABLISHED, RELATED nor INVALID
            i += 4
        elif a == "-m" and args[i + 1] == "comment":
            i += 4
        elif a == "-m" and args[i + 1] == "mark":
            assert args[i + 2] == "--mark"
            value, mask = (int(x, 16) for x in args[i + 3].split("/"))
            if pkt.mark & mask != value:
                return False
            i += 4
        elif a == "-m" and args[i + 1] == "set":
            assert args[i + 2] == "--match-set"
            s, dirs = state.ipsets[args[i + 3]], args[i + 4]
            ip = pkt.src if dirs.startswith("src") else pkt.dst
            if not in_set(s, ip, pkt.proto, pkt.dport):
                return False
            i += 5
        elif a in ("-j", "-g"):
            return True
        else:
            raise ValueError(f"the model does not know {a!r} in {args}")
    return True


def _target(args: list[str]) -> tuple[str, str, list[str]]:
    for i, a in enumerate(args):
        if a in ("-j", "-g"):
            return a, args[i + 1], args[i + 2 :]
    return "", "", []


@functools.lru_cache(maxsize=65536)
def _split(rule: str) -> list[str]:
    return shlex.split(rule)


def run_chain(state: DataplaneState, chain: str, pkt: Packet) -> str:
    """ACCEPT, DROP, or RETURN (fell off the end / returned)."""
    for rule in state.tables["filter"][chain].rules:
        pkt.rules_seen += 1
        args = _split(rule)
        if not _matches(state, args, pkt):
            continue
        how, target, rest = _target(args)
        if target in ("ACCEPT", "DROP"):
            pkt.trace.append(f"{chain}: {target}")
            return target
        if target == "RETURN":
            return "RETURN"
        if target == "MARK":
            assert rest[0] == "--set-xmark"
            value, mask = (int(x, 16) for x in rest[1].split("/"))
            pkt.mark = (pkt.mark & ~mask) ^ value
            continue
        verdict = run_chain(state, target, pkt)
        if verdict != "RETURN":
            return verdict
        if how == "-g":
            return "RETURN"  # a goto returns to the caller of this chain
    return "RETURN"


def hook(state: DataplaneState, builtin: str, pkt: Packet) -> bool:
    """True if the packet passes the built-in chain (our jump first; a RETURN falls to the default ACCEPT)."""
    for jump in state.jumps:
        if jump.chain == builtin:
            args = _split(jump.rule)
            pkt.rules_seen += 1
            if _matches(state, args, pkt):
                return run_chain(state, _target(args)[1], pkt) != "DROP"
    return True
