"""Kernel side of a pod attachment: veth pair, host sysctls, the /32 route, the pod's address and routes.

Netlink in-process (``cni.netlink``, a few fixed rtnetlink messages); another network namespace is entered by the
*calling thread only* (``setns(2)`` applies per thread), and a netlink socket opened there stays bound to that
namespace. So the server configures many pods at once with no helper process and no fork. The first version ran
four ``ip``/``nsenter`` executions per ADD (~15-30 ms), the second pyroute2 (~6 ms of CPU, most of it pyroute2's
own machinery); these messages cost well under a millisecond of Python.

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
from typing import TypeVar

from cni.netlink import IFF_UP, RT_TABLE_MAIN, SCOPE_LINK, SCOPE_UNIVERSE, NetlinkError, Rtnl
from datastore.constants import ROUTE_PROTO

GATEWAY = "169.254.1.1"
HOST_MAC = "ee:ee:ee:ee:ee:ee"  # every host veth: the pod only ever talks to its gateway, proxied here
PROTO_BOOT = 3  # what `ip route add` uses; inside the pod nothing else writes routes
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
def rtnl(netns: str | None) -> Iterator[Rtnl]:
    """A netlink socket bound to ``netns`` (opened from inside it), usable from here."""
    sock = in_netns(netns, Rtnl)
    try:
        yield sock
    except NetlinkError as exc:
        raise LinkError(f"netlink: {exc.strerror}") from None
    finally:
        sock.close()


def _index(sock: Rtnl, ifname: str) -> int | None:
    found = sock.link(ifname)
    return found.index if found is not None else None


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
    with rtnl(host_netns) as sock:
        return sock.delete_link(ifname)


@dataclass(frozen=True)
class Attachment:
    host_if: str
    pod_if: str
    netns: str
    ip: str
    mtu: int
    mac: str
    host_netns: str | None = None  # None: our own namespace is the node's


def _add_veth(sock: Rtnl, att: Attachment) -> None:
    try:
        pod_fd = os.open(att.netns, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise LinkError(f"container network namespace {att.netns}: {exc.strerror}") from None
    try:
        sock.add_veth(att.host_if, att.pod_if, mtu=att.mtu, host_mac=HOST_MAC, peer_mac=att.mac, peer_netns_fd=pod_fd)
    finally:
        os.close(pod_fd)


def create(att: Attachment) -> None:
    """Create and configure both ends. Raises ``LinkError``; the caller deletes ``host_if`` to undo.
    A stale veth of the same name (an earlier sandbox of the pod) is replaced."""
    with rtnl(att.host_netns) as host:
        try:
            _add_veth(host, att)
        except NetlinkError as exc:
            if exc.errno != errno.EEXIST:
                raise
            host.delete_link(att.host_if)
            _add_veth(host, att)
        idx = _index(host, att.host_if)
        if idx is None:
            raise LinkError(f"{att.host_if} vanished right after it was created")
        # Host side: no address; answer ARP for the gateway (and anything routable) at once; forward.
        _sysctls(
            att.host_netns,
            {
                f"net.ipv4.conf.{att.host_if}.proxy_arp": "1",
                f"net.ipv4.neigh.{att.host_if}.proxy_delay": "0",
                f"net.ipv4.conf.{att.host_if}.forwarding": "1",
            },
        )
        host.add_route(att.ip, 32, oif=idx, proto=ROUTE_PROTO, scope=SCOPE_LINK, replace=True)
    with rtnl(att.netns) as pod:
        pidx = _index(pod, att.pod_if)
        if pidx is None:
            raise LinkError(f"{att.pod_if} is missing in {att.netns}")
        pod.set_up(pidx)
        pod.add_addr(pidx, att.ip, 32)
        pod.add_route(GATEWAY, 32, oif=pidx, scope=SCOPE_LINK, proto=PROTO_BOOT)
        pod.add_route("0.0.0.0", 0, oif=pidx, gateway=GATEWAY, scope=SCOPE_UNIVERSE, proto=PROTO_BOOT)


def verify(att: Attachment) -> list[str]:
    """What differs from the intended attachment (empty when all is in place)."""
    problems: list[str] = []
    with rtnl(att.host_netns) as host:
        found = host.link(att.host_if)
        if found is None:
            return [f"host interface {att.host_if} is missing"]
        if not found.flags & IFF_UP:
            problems.append(f"host interface {att.host_if} is not up")
        routes = host.routes()
        if not any(
            r.table == RT_TABLE_MAIN and r.dst == att.ip and r.dst_len == 32 and r.proto == ROUTE_PROTO
            and r.oif == found.index
            for r in routes
        ):  # fmt: skip
            problems.append(f"no route {att.ip}/32 dev {att.host_if} proto {ROUTE_PROTO}")
    if _read_sysctl(att.host_netns, f"net.ipv4.conf.{att.host_if}.proxy_arp") != "1":
        problems.append(f"proxy_arp is not on for {att.host_if}")
    try:
        with rtnl(att.netns) as pod:
            pidx = _index(pod, att.pod_if)
            if pidx is None:
                return [*problems, f"pod interface {att.pod_if} is missing"]
            have = {f"{a.address}/{a.prefixlen}" for a in pod.addrs() if a.index == pidx}
            gateways = {r.gateway for r in pod.routes() if r.dst_len == 0 and r.table == RT_TABLE_MAIN}
    except LinkError as exc:
        return [*problems, f"pod side: {exc}"]
    if f"{att.ip}/32" not in have:
        problems.append(f"pod interface {att.pod_if} lacks {att.ip}/32 (has {', '.join(sorted(have)) or 'none'})")
    if GATEWAY not in gateways:
        problems.append(f"pod has no default route via {GATEWAY}")
    return problems
