"""The ExaBGP API commands podnet sends, their builders, and the validator the bridge applies to every line.
Pure. Only these shapes pass the bridge: a malformed or unexpected line is refused before it reaches ExaBGP."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from bgp import aspath
from bgp.aspath import AsPath


@dataclass(frozen=True)
class OutRoute:
    """A route as we send it to one peer: our own (no originator) or a reflected one."""

    prefix: str
    next_hop: str
    local_pref: int | None = None
    as_path: AsPath = ()
    originator_id: str | None = None
    cluster_list: tuple[str, ...] = ()


class CommandError(ValueError):
    """A line the bridge refuses to pass to ExaBGP."""


def check_address(address: str) -> None:
    """Raise CommandError unless ``address`` is an IPv4 address as the API takes it."""
    try:
        ok = str(ipaddress.IPv4Address(address)) == address
    except ValueError:
        ok = False
    if not ok:
        raise CommandError(f"{address!r} is not an IPv4 address")


def check_prefix(prefix: str) -> None:
    """Raise CommandError unless ``prefix`` is an IPv4 network in canonical form (no host bits)."""
    try:
        ok = str(ipaddress.IPv4Network(prefix, strict=True)) == prefix
    except ValueError:
        ok = False
    if not ok:
        raise CommandError(f"{prefix!r} is not an IPv4 network (a.b.c.d/len, no host bits)")


def _targets(neighbors: Sequence[str]) -> str:
    if not neighbors:
        raise CommandError("a command needs at least one neighbor")
    return " , ".join(f"neighbor {ipaddress.ip_address(n)}" for n in neighbors)


def announce(neighbors: Sequence[str], route: OutRoute) -> str:
    parts = [f"{_targets(neighbors)} announce route {route.prefix} next-hop {route.next_hop}"]
    if route.local_pref is not None:
        parts.append(f"local-preference {route.local_pref}")
    if route.as_path:
        try:
            parts.append(f"as-path {aspath.to_command(route.as_path)}")
        except ValueError as exc:
            raise CommandError(str(exc)) from None
    if route.originator_id is not None:
        parts.append(f"originator-id {route.originator_id}")
    if route.cluster_list:
        parts.append(f"cluster-list [ {' '.join(route.cluster_list)} ]")
    line = " ".join(parts)
    validate(line)
    return line


def withdraw(neighbors: Sequence[str], prefix: str) -> str:
    line = f"{_targets(neighbors)} withdraw route {prefix}"
    validate(line)
    return line


def eor(neighbor: str) -> str:
    return f"{_targets([neighbor])} announce eor ipv4 unicast"


def route_refresh(neighbor: str) -> str:
    return f"{_targets([neighbor])} announce route-refresh ipv4 unicast"


SHOW_NEIGHBORS = "show neighbor json"
RELOAD = "reload"

_IP = r"\d{1,3}(?:\.\d{1,3}){3}"
_NEIGHBORS = rf"neighbor {_IP}(?: , neighbor {_IP})*"
_ROUTE = (
    rf"announce route (?P<prefix>{_IP}/\d{{1,2}}) next-hop {_IP}"
    r"(?: local-preference \d{1,10})?"
    r"(?: as-path(?: \[(?: [1-9]\d{0,9})+ \]| \((?: [1-9]\d{0,9})+ \))+)?"  # AS 0 never (RFC 7607)
    rf"(?: originator-id {_IP})?"
    rf"(?: cluster-list \[(?: {_IP})+ \])?"
)
_GRAMMAR = [
    re.compile(rf"^{_NEIGHBORS} {_ROUTE}$"),
    re.compile(rf"^{_NEIGHBORS} withdraw route (?P<prefix>{_IP}/\d{{1,2}})$"),
    re.compile(rf"^{_NEIGHBORS} announce (?:eor|route-refresh) ipv4 unicast$"),
    re.compile(r"^show neighbor json$"),
    re.compile(r"^reload$"),
]


def validate(line: str) -> None:
    """Raise CommandError unless ``line`` is one command podnet sends, with well-formed addresses and prefix."""
    for pattern in _GRAMMAR:
        match = pattern.match(line)
        if match is None:
            continue
        for token in re.findall(_IP + r"(?:/\d{1,2})?", line):
            try:
                ipaddress.ip_network(token, strict=True) if "/" in token else ipaddress.ip_address(token)
            except ValueError as exc:
                raise CommandError(f"bad address in command: {exc}") from None
        return
    raise CommandError(f"not a command podnet sends: {line[:200]!r}")
