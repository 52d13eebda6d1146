"""Kernel side of a pod attachment: veth pair, host sysctls, the /32 route, the pod's address and routes.

Netlink in-process with pyroute2; another network namespace is entered by the *calling thread only*
(``setns(2)`` applies per thread), and a netlink socket opened there stays bound to that namespace. So the server
configures many pods at once with no helper process: measured here ~6 ms per attachment, against ~15-30 ms for the
same work with four ``ip``/``nsenter`` executions (each a fork of the server). pyroute2's own netns support forks a
child to open each socket, which is what this avoids.

The host side is the current namespace (the node's) unless the config names another (``hostNetns``: the test bed
and the lab, whose nodes are network namespaces while etcd listens on the machine's loopback). The pod's gateway is
the link-local 169.254.1.1, answered by proxy ARP on the host veth.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from datastore.constants import ROUTE_PROTO

GATEWAY = "169.254.1.1"
HOST_MAC = "ee:ee:ee:ee:ee:ee"  # every host veth: the pod only ever talks to its gateway, proxied here
SCOPE_LINK = 253
PROTO_BOOT = 3  # what `ip route add` uses; inside the pod nothing else writes routes
IFF_UP = 0x1
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

T = TypeVar("T")


class LinkError(Exception):
    """A kernel operation failed."""


def host_ifname(namespace: str, pod: str) -> str:
    """cali + the first 11 hex digits of sha1("<namespace>.<pod>"): stable per pod, 15 characters."""
    return "cali" + hashlib.sha1(f"{namespace}.{pod}".encode()).hexdigest()[:11]


def pod_mac(container_id: str) -> str:
    """A locally administered unicast MAC derived from the container ID (stable across CHECKs)."""
    digest = hashlib.sha1(container_id.encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x0A | (digest[0] & 0xF0), *digest[1:6]))


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise LinkError(f"setns: {os.strerror(err)}")


def in_netns(path: str | None, fn: Callable[[], T]) -> T:
    """Run ``fn`` with this thread in the network namespace at ``path`` (None: stay), then come back."""
    if path is None:
        return fn()
    try:
        target = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise LinkError(f"network namespace {path}: {exc.strerror}") from None
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _setns(target)
        try:
            return fn()
        finally:
            _setns(own)  # if this failed the thread would be lost in the pod: LinkError ends the request
    finally:
        os.close(target)
        os.close(own)


@contextlib.contextmanager
def rtnl(netns: str | None) -> Iterator[IPRoute]:
    """A netlink socket bound to ``netns`` (opened from inside it), usable from here."""
    ipr = in_netns(netns, IPRoute)
    try:
        yield ipr
    except NetlinkError as exc:
        raise LinkError(f"netlink: {os.strerror(exc.code) if exc.code > 0 else exc}") from None
    finally:
        ipr.close()


def _index(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def _sysctls(host_netns: str | None, values: dict[str, str]) -> None:
    """Write net sysctls of the host namespace (/proc/sys/net follows the writing thread's namespace)."""

    def write() -> None:
        for key, value in values.items():
            path = "/proc/sys/" + key.replace(".", "/")
            try:
                with open(path, "w") as fh:
                    fh.write(value)
            except OSError as exc:
                raise LinkError(f"writing {path}: {exc.strerror}") from None

    in_netns(host_netns, write)


def _read_sysctl(host_netns: str | None, key: str) -> str:
    def read() -> str:
        try:
            with open("/proc/sys/" + key.replace(".", "/")) as fh:
                return fh.read().strip()
        except OSError:
            return "?"

    return in_netns(host_netns, read)


def delete(ifname: str, host_netns: str | None = None) -> bool:
    """Delete a host-side veth (its pod end and its routes go with it). False if it was not there."""
    with rtnl(host_netns) as ipr:
        idx = _index(ipr, ifname)
        if idx is None:
            return False
        try:
            ipr.link("del", index=idx)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return False
            raise
        return True


@dataclass(frozen=True)
class Attachment:
    host_if: str
    pod_if: str
    netns: str
    ip: str
    mtu: int
    mac: str
    host_netns: str | None = None  # None: our own namespace is the node's


def _add_veth(ipr: IPRoute, att: Attachment) -> int:
    try:
        pod_fd = os.open(att.netns, os.O_RDONLY)
    except OSError as exc:
        raise LinkError(f"container network namespace {att.netns}: {exc.strerror}") from None
    try:
        peer: dict[str, Any] = {"ifname": att.pod_if, "mtu": att.mtu, "address": att.mac, "net_ns_fd": pod_fd}
        ipr.link("add", ifname=att.host_if, kind="veth", mtu=att.mtu, address=HOST_MAC, peer=peer)
    finally:
        os.close(pod_fd)
    idx = _index(ipr, att.host_if)
    if idx is None:
        raise LinkError(f"{att.host_if} vanished right after it was created")
    return idx


def create(att: Attachment) -> None:
    """Create and configure both ends. Raises ``LinkError``; the caller deletes ``host_if`` to undo. A stale veth
    of the same name (an earlier sandbox of the pod) is replaced."""
    with rtnl(att.host_netns) as ipr:
        try:
            idx = _add_veth(ipr, att)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
            old = _index(ipr, att.host_if)
            if old is not None:
                ipr.link("del", index=old)
            idx = _add_veth(ipr, att)
        # Host side: no address; answer ARP for the gateway (and anything routable) at once; forward.
        _sysctls(
            att.host_netns,
            {
                f"net.ipv4.conf.{att.host_if}.proxy_arp": "1",
                f"net.ipv4.neigh.{att.host_if}.proxy_delay": "0",
                f"net.ipv4.conf.{att.host_if}.forwarding": "1",
            },
        )
        ipr.link("set", index=idx, state="up")
        ipr.route("replace", dst=f"{att.ip}/32", oif=idx, proto=ROUTE_PROTO, scope=SCOPE_LINK)
    with rtnl(att.netns) as pod:
        pidx = _index(pod, att.pod_if)
        if pidx is None:
            raise LinkError(f"{att.pod_if} is missing in {att.netns}")
        pod.link("set", index=pidx, state="up")
        pod.addr("add", index=pidx, address=att.ip, prefixlen=32)
        pod.route("add", dst=f"{GATEWAY}/32", oif=pidx, scope=SCOPE_LINK, proto=PROTO_BOOT)
        pod.route("add", dst="0.0.0.0/0", gateway=GATEWAY, oif=pidx, proto=PROTO_BOOT)


def verify(att: Attachment) -> list[str]:
    """What differs from the intended attachment (empty when all is in place)."""
    problems: list[str] = []
    with rtnl(att.host_netns) as ipr:
        idx = _index(ipr, att.host_if)
        if idx is None:
            return [f"host interface {att.host_if} is missing"]
        if not ipr.link("get", index=idx)[0]["flags"] & IFF_UP:
            problems.append(f"host interface {att.host_if} is not up")
        routes = ipr.route("dump", family=2, dst=att.ip, dst_len=32, proto=ROUTE_PROTO)
        if not any(r.get_attr("RTA_OIF") == idx for r in routes):
            problems.append(f"no route {att.ip}/32 dev {att.host_if} proto {ROUTE_PROTO}")
    if _read_sysctl(att.host_netns, f"net.ipv4.conf.{att.host_if}.proxy_arp") != "1":
        problems.append(f"proxy_arp is not on for {att.host_if}")
    try:
        with rtnl(att.netns) as pod:
            pidx = _index(pod, att.pod_if)
            if pidx is None:
                return [*problems, f"pod interface {att.pod_if} is missing"]
            have = {f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in pod.addr("dump", family=2, index=pidx)}
            gateways = {r.get_attr("RTA_GATEWAY") for r in pod.route("dump", family=2, dst_len=0)}
    except LinkError as exc:
        return [*problems, f"pod side: {exc}"]
    if f"{att.ip}/32" not in have:
        problems.append(f"pod interface {att.pod_if} lacks {att.ip}/32 (has {', '.join(sorted(have)) or 'none'})")
    if GATEWAY not in gateways:
        problems.append(f"pod has no default route via {GATEWAY}")
    return problems
