"""The node's IPv4 address, found the way Calico's ``IP_AUTODETECTION_METHOD`` finds it.

Methods (``parse_method``):

- ``first-found``: the first global IPv4 address on an interface that is up and not skipped (``SKIPPED``: lo and
  the devices of container runtimes, tunnels and podnet itself);
- ``interface=REGEX[,REGEX…]``: the first address on the first interface whose *whole* name matches one of the
  regexes (anchored, unlike Calico's, so that ``eth0`` does not match ``veth0abc``);
- ``skip-interface=REGEX[,REGEX…]``: ``first-found`` that also skips these interfaces;
- ``can-reach=IP``: the source address the kernel would use to reach IP (a UDP socket is connected: no packet);
- ``cidr=CIDR[,CIDR…]``: the first address inside one of the CIDRs (on an interface that is not skipped);
- an address (``192.168.77.10`` or ``192.168.77.10/24``): that one, which must be on one of the node's interfaces.

The selection (``select``) is pure: it takes the node's addresses, in the order the reader gives them (interfaces
by index, then the kernel's order of addresses: primary first), and returns the address with a sentence saying
which method chose it and why, or raises ``AutodetectError`` saying what it looked at. ``read_addresses`` and
``route_source`` read the kernel (optionally in a named network namespace); ``detect`` puts the two together.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from cni.link import LinkError, in_netns

# Interfaces that never carry the node's address: loopback, podnet's host veths and tunnel devices (tunl0,
# vxlan.podnet), and other runtimes' bridges and veths. fnmatch patterns, listed in the docs.
SKIPPED = ("lo", "cali*", "tunl*", "vxlan*", "docker*", "veth*", "kube-ipvs*", "cni*")

FIRST_FOUND = "first-found"
INTERFACE = "interface"
SKIP_INTERFACE = "skip-interface"
CAN_REACH = "can-reach"
CIDR = "cidr"
ADDRESS = "address"
KINDS = (FIRST_FOUND, INTERFACE, SKIP_INTERFACE, CAN_REACH, CIDR)  # ADDRESS is written as the address itself

IFF_UP = 0x1
_NETNS_DIR = "/run/netns"

T = TypeVar("T")


class AutodetectError(Exception):
    """No address fits the method (the message says what was looked at), or the kernel could not be read."""


@dataclass(frozen=True)
class Address:
    """One IPv4 address of the node, with its prefix, on ``interface``."""

    interface: str
    address: ipaddress.IPv4Interface
    up: bool = True

    @classmethod
    def of(cls, interface: str, address: str, up: bool = True) -> Address:
        return cls(interface, ipaddress.IPv4Interface(address), up)


@dataclass(frozen=True)
class Method:
    """A parsed autodetection method; ``text`` is its canonical spelling (what the config shows)."""

    kind: str
    text: str
    regexes: tuple[re.Pattern[str], ...] = ()
    cidrs: tuple[ipaddress.IPv4Network, ...] = ()
    target: ipaddress.IPv4Address | None = None  # can-reach
    address: ipaddress.IPv4Interface | None = None  # an explicit address (prefix 32 when none was written)
    prefix_given: bool = False

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Detected:
    address: ipaddress.IPv4Interface  # with the interface's prefix
    interface: str
    method: str  # Method.text
    reason: str

    @property
    def ip(self) -> str:
        return str(self.address.ip)

    def explain(self) -> str:
        return f"node IP {self.address} on {self.interface} ({self.method}: {self.reason})"


def _split(value: str, what: str, text: str) -> list[str]:
    parts = [p.strip() for p in value.split(",")]
    if not value.strip() or any(not p for p in parts):
        raise ValueError(f"{text!r}: expected {what} after '=' (comma-separated, none empty)")
    return parts


def parse_method(text: str) -> Method:
    """Parse a method; ``ValueError`` with a message that quotes ``text`` when it is not one."""
    raw = text.strip()
    kind, eq, value = raw.partition("=")
    kind = kind.strip().lower()
    if not eq:
        if kind == FIRST_FOUND:
            return Method(FIRST_FOUND, FIRST_FOUND)
        try:
            iface = ipaddress.IPv4Interface(raw)
        except ValueError:
            pass
        else:
            _check_unicast(iface.ip, text)
            return Method(ADDRESS, raw, address=iface, prefix_given="/" in raw)
        raise ValueError(
            f"{text!r} is not an autodetection method: expected first-found, interface=REGEX, "
            "skip-interface=REGEX, can-reach=IP, cidr=CIDR or an IPv4 address"
        )
    value = value.strip()
    if kind in (INTERFACE, SKIP_INTERFACE):
        patterns = _split(value, "regular expressions", text)
        compiled = []
        for p in patterns:
            try:
                compiled.append(re.compile(p))
            except re.error as exc:
                raise ValueError(f"{text!r}: {p!r} is not a regular expression ({exc})") from None
        return Method(kind, f"{kind}={','.join(patterns)}", regexes=tuple(compiled))
    if kind == CAN_REACH:
        try:
            target = ipaddress.IPv4Address(value)
        except ValueError:
            raise ValueError(f"{text!r}: can-reach needs an IPv4 address, not {value!r}") from None
        _check_unicast(target, text)
        return Method(CAN_REACH, f"{CAN_REACH}={target}", target=target)
    if kind == CIDR:
        nets = []
        for p in _split(value, "IPv4 CIDRs", text):
            try:
                nets.append(ipaddress.IPv4Network(p))
            except ValueError as exc:
                raise ValueError(f"{text!r}: {p!r} is not an IPv4 CIDR ({exc})") from None
        return Method(CIDR, f"{CIDR}={','.join(str(n) for n in nets)}", cidrs=tuple(nets))
    raise ValueError(f"{text!r}: unknown autodetection method {kind!r} (expected one of {', '.join(KINDS)})")


def _check_unicast(ip: ipaddress.IPv4Address, text: str) -> None:
    if ip.is_unspecified or ip.is_multicast or ip.is_loopback or ip == ipaddress.IPv4Address("255.255.255.255"):
        raise ValueError(f"{text!r}: {ip} is not a unicast address another host could use")


def skipped_by_default(interface: str) -> str | None:
    """The pattern of ``SKIPPED`` that ``interface`` matches, if any."""
    return next((p for p in SKIPPED if fnmatch.fnmatchcase(interface, p)), None)


def _global(ip: ipaddress.IPv4Address) -> bool:
    return not (ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified)


def _why_not(a: Address, extra_skip: Sequence[re.Pattern[str]] = (), use_default_skip: bool = True) -> str | None:
    """Why ``a`` cannot be the node's address under a scanning method (None: it can)."""
    if use_default_skip and (pattern := skipped_by_default(a.interface)) is not None:
        return f"skipped ({pattern})"
    for rx in extra_skip:
        if rx.fullmatch(a.interface):
            return f"skipped ({rx.pattern})"
    if not a.up:
        return "down"
    if not _global(a.address.ip):
        return "not a global address"
    return None


def _seen(notes: list[str]) -> str:
    return "; ".join(notes) if notes else "the node has no global IPv4 address"


def _scan(
    method: Method,
    addresses: Sequence[Address],
    *,
    accept: Callable[[Address], bool] = lambda a: True,  # the method's own test, after the common ones
    why_rejected: str = "",
    extra_skip: Sequence[re.Pattern[str]] = (),
    use_default_skip: bool = True,
    wanted: str = "",
) -> Detected:
    notes: list[str] = []
    for a in addresses:
        reason = _why_not(a, extra_skip, use_default_skip)
        if reason is None and not accept(a):
            reason = why_rejected
        if reason is None:
            passed = f"; passed over: {'; '.join(notes)}" if notes else ""
            return Detected(a.address, a.interface, method.text, wanted + passed)
        notes.append(f"{a.interface} {a.address} {reason}")
    raise AutodetectError(f"{method.text}: no usable IPv4 address ({_seen(notes)})")


def select(method: Method, addresses: Sequence[Address], route_source: ipaddress.IPv4Address | None = None) -> Detected:
    """The node's address by ``method`` among ``addresses`` (in the reader's order). ``route_source`` is, for
    ``can-reach``, the source address the kernel chose for the target."""
    if method.kind == FIRST_FOUND:
        return _scan(method, addresses, wanted="the first global address on an interface not skipped")
    if method.kind == SKIP_INTERFACE:
        return _scan(
            method,
            addresses,
            extra_skip=method.regexes,
            wanted="the first global address on an interface not skipped (nor matched)",
        )
    if method.kind == INTERFACE:
        names = ", ".join(rx.pattern for rx in method.regexes)
        return _scan(
            method,
            addresses,
            accept=lambda a: any(rx.fullmatch(a.interface) for rx in method.regexes),
            why_rejected=f"does not match {names}",
            use_default_skip=False,
            wanted=f"the first global address on an interface matching {names}",
        )
    if method.kind == CIDR:
        nets = ", ".join(str(n) for n in method.cidrs)
        return _scan(
            method,
            addresses,
            accept=lambda a: any(a.address.ip in n for n in method.cidrs),
            why_rejected=f"not in {nets}",
            wanted=f"the first global address in {nets}",
        )
    if method.kind == CAN_REACH:
        if route_source is None:
            raise ValueError("can-reach: the kernel's source address is required")
        return _own(method, addresses, route_source, f"the source address of the route to {method.target}")
    if method.kind == ADDRESS:
        assert method.address is not None
        found = _own(method, addresses, method.address.ip, "set explicitly")
        if method.prefix_given and found.address != method.address:
            raise AutodetectError(f"{method.text}: the address is {found.address} on {found.interface}")
        return found
    raise ValueError(f"unknown method kind {method.kind!r}")


def _own(method: Method, addresses: Sequence[Address], ip: ipaddress.IPv4Address, why: str) -> Detected:
    """``ip`` as one of the node's addresses (its interface and prefix), or why it cannot be the node's."""
    for a in addresses:
        if a.address.ip != ip:
            continue
        reason = _why_not(a, use_default_skip=method.kind != ADDRESS)
        if reason is not None:
            raise AutodetectError(f"{method.text}: {ip} is on {a.interface}, which is {reason}")
        return Detected(a.address, a.interface, method.text, why)
    raise AutodetectError(f"{method.text}: {ip} is not an address of any interface of this node")


# -- reading the kernel ----------------------------------------------------------------------------------------


def _netns_path(netns: str | None) -> str | None:
    return None if netns is None else f"{_NETNS_DIR}/{netns}"


def _in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    try:
        return in_netns(_netns_path(netns), fn)
    except LinkError as exc:
        raise AutodetectError(str(exc)) from None


def _dump() -> list[Address]:
    from pyroute2 import IPRoute  # only the reader needs it (the selection is pure)

    with IPRoute() as ipr:
        links = {int(msg["index"]): msg for msg in ipr.get_links()}
        addrs = list(ipr.get_addr(family=socket.AF_INET))
    out: list[tuple[int, int, Address]] = []
    for position, msg in enumerate(addrs):
        if msg["scope"] != 0:  # RT_SCOPE_UNIVERSE: no host (127/8) or link scope addresses
            continue
        index = int(msg["index"])
        link = links.get(index)
        if link is None:
            continue
        local = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
        address = ipaddress.IPv4Interface(f"{local}/{msg['prefixlen']}")
        up = bool(link["flags"] & IFF_UP)
        out.append((index, position, Address(str(link.get("ifname")), address, up)))
    return [a for _, _, a in sorted(out, key=lambda t: (t[0], t[1]))]


def read_addresses(netns: str | None = None) -> list[Address]:
    """The global-scope IPv4 addresses of the node (of network namespace ``netns``): interfaces by index,
    addresses in the kernel's order (primary before secondary)."""
    return _in_netns(netns, _dump)


def route_source(target: ipaddress.IPv4Address, netns: str | None = None) -> ipaddress.IPv4Address:
    """The source address the kernel would use to reach ``target``: a connected UDP socket, no packet sent."""

    def probe() -> str:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((str(target), 9))  # port 9 (discard); connect() on UDP only picks the route
            return str(sock.getsockname()[0])

    try:
        return ipaddress.IPv4Address(_in_netns(netns, probe))
    except OSError as exc:
        raise AutodetectError(f"can-reach={target}: the node has no route to it ({exc.strerror})") from None


def detect(method: Method, netns: str | None = None) -> Detected:
    """Read the node's interfaces (in ``netns``) and choose its address by ``method``."""
    addresses = read_addresses(netns)
    source = route_source(method.target, netns) if method.target is not None else None
    return select(method, addresses, source)
