"""Desired iptables + ipset state: what the policy compiler (agent.calc.policy) produces and the dataplane writers
(agent.dataplane) program. Pure data, frozen, comparable, so a writer can diff two of them."""

from __future__ import annotations

from dataclasses import dataclass, field

IPSET_TYPES = ("hash:ip", "hash:net", "hash:ip,port", "hash:net,port")


@dataclass(frozen=True)
class IpSet:
    """An ipset we own. ``members`` are written as `ipset add` takes them, e.g. "10.244.1.5",
    "10.0.0.0/8", "10.1.0.0/16 nomatch", "10.244.1.5,tcp:8080"."""

    name: str  # podnet-… , at most 31 characters
    type: str  # one of IPSET_TYPES
    members: frozenset[str] = frozenset()
    family: str = "inet"


@dataclass(frozen=True)
class Chain:
    """A chain we own; each rule is what follows `-A <name> ` in iptables-restore input."""

    name: str  # podnet-… , at most 28 characters
    rules: tuple[str, ...] = ()
    # False: the rules carry no hash comment and are compared with the kernel by their text, which must then be the
    # form iptables-save prints. For the few chains every forwarded packet crosses: with iptables-nft each comment
    # is a compat match evaluated per packet.
    hashed: bool = True


@dataclass(frozen=True)
class KernelJump:
    """The one rule we insert at the top of a built-in chain (FORWARD, INPUT, OUTPUT) of a table."""

    table: str
    chain: str
    rule: str  # what follows `-I <chain> 1 `, e.g. "-m comment --comment podnet -j podnet-FORWARD"


@dataclass(frozen=True)
class DataplaneState:
    ipsets: dict[str, IpSet] = field(default_factory=dict)  # name ->
    tables: dict[str, dict[str, Chain]] = field(default_factory=dict)  # table -> chain name ->
    jumps: tuple[KernelJump, ...] = ()
