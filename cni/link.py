"""Kernel side of a pod attachment, done with iproute2 (``ip -batch``) and /proc/sys writes.

Why iproute2 and not pyroute2: the plugin must be quick in a fresh process, and pyroute2 costs ~0.3 s to import
here and forks a helper process to open a socket in another namespace; ``ip`` starts in ~3 ms and one
``ip -n <ns> -batch -`` configures each side. The host side is the current network
namespace (the node's) unless the config names another (``hostNetns``: the test bed and the lab, whose nodes are
network namespaces while etcd listens on the machine's loopback). The pod's gateway is the link-local
169.254.1.1, answered by proxy ARP on the host veth.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import dataclass
from typing import Any

from datastore.constants import ROUTE_PROTO

GATEWAY = "169.254.1.1"
HOST_MAC = "ee:ee:ee:ee:ee:ee"  # every host veth: the pod only ever talks to its gateway, proxied here
TIMEOUT = 20.0
NAMED_NETNS_DIRS = ("/var/run/netns", "/run/netns")  # where `ip -n NAME` looks


class LinkError(Exception):
    """A kernel operation failed (message from iproute2)."""


def host_ifname(namespace: str, pod: str) -> str:
    """cali + the first 11 hex digits of sha1("<namespace>.<pod>"): stable per pod, 15 characters."""
    return "cali" + hashlib.sha1(f"{namespace}.{pod}".encode()).hexdigest()[:11]


def pod_mac(container_id: str) -> str:
    """A locally administered unicast MAC derived from the container ID (stable across CHECKs)."""
    digest = hashlib.sha1(container_id.encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x0A | (digest[0] & 0xF0), *digest[1:6]))


def _run(cmd: list[str], stdin: str | None = None) -> str:
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    if proc.returncode != 0:
        raise LinkError(f"{' '.join(cmd[:4])}…: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def ip_cmd(netns: str | None) -> list[str]:
    """``ip`` acting in ``netns`` (a path; None: our own): ``ip -n NAME`` for a named namespace (one exec),
    ``nsenter`` for any other path (e.g. /proc/<pid>/ns/net)."""
    if netns is None:
        return ["ip"]
    if os.path.dirname(netns) in NAMED_NETNS_DIRS:
        return ["ip", "-n", os.path.basename(netns)]
    return ["nsenter", f"--net={netns}", "ip"]


def _sysctls(host_netns: str | None, values: dict[str, str]) -> None:
    """Set net sysctls of the host namespace: direct /proc writes in our own namespace (no exec)."""
    if host_netns is not None:
        _run(["nsenter", f"--net={host_netns}", "sysctl", "-q", "-w", *(f"{k}={v}" for k, v in values.items())])
        return
    for key, value in values.items():
        path = "/proc/sys/" + key.replace(".", "/")
        try:
            with open(path, "w") as fh:
                fh.write(value)
        except OSError as exc:
            raise LinkError(f"writing {path}: {exc}") from None


def exists(ifname: str, host_netns: str | None = None) -> bool:
    cmd = [*ip_cmd(host_netns), "link", "show", "dev", ifname]
    return subprocess.run(cmd, capture_output=True, check=False).returncode == 0


def delete(ifname: str, host_netns: str | None = None) -> bool:
    """Delete a host-side veth (its pod end and its routes go with it). False if it was not there."""
    cmd = [*ip_cmd(host_netns), "link", "del", "dev", ifname]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode == 0:
        return True
    if "Cannot find device" in proc.stderr or "does not exist" in proc.stderr:
        return False
    raise LinkError(f"ip link del {ifname}: {proc.stderr.strip()}")


@dataclass(frozen=True)
class Attachment:
    host_if: str
    pod_if: str
    netns: str
    ip: str
    mtu: int
    mac: str
    host_netns: str | None = None  # None: our own namespace is the node's


def create(att: Attachment) -> None:
    """Create and configure both ends: one ``ip -batch`` per side. Raises ``LinkError``; the caller deletes
    ``host_if`` to undo. A stale veth of the same name (an earlier sandbox of the pod) is replaced."""
    host_side = (
        f"link add {att.host_if} mtu {att.mtu} address {HOST_MAC} type veth"
        f" peer name {att.pod_if} mtu {att.mtu} address {att.mac} netns {att.netns}\n"
        f"link set {att.host_if} up\n"
        f"route replace {att.ip}/32 dev {att.host_if} proto {ROUTE_PROTO} scope link\n"
    )
    try:
        _run([*ip_cmd(att.host_netns), "-batch", "-"], host_side)
    except LinkError as exc:
        if "File exists" not in str(exc):
            raise
        delete(att.host_if, att.host_netns)
        _run([*ip_cmd(att.host_netns), "-batch", "-"], host_side)
    # Host side: no address; answer ARP for the gateway (and anything routable) at once; forward.
    _sysctls(
        att.host_netns,
        {
            f"net.ipv4.conf.{att.host_if}.proxy_arp": "1",
            f"net.ipv4.neigh.{att.host_if}.proxy_delay": "0",
            f"net.ipv4.conf.{att.host_if}.forwarding": "1",
        },
    )
    pod_side = (
        f"link set {att.pod_if} up\n"
        f"addr add {att.ip}/32 dev {att.pod_if}\n"
        f"route add {GATEWAY} dev {att.pod_if} scope link\n"
        f"route add default via {GATEWAY} dev {att.pod_if}\n"
    )
    _run([*ip_cmd(att.netns), "-batch", "-"], pod_side)


def _json(out: str) -> list[dict[str, Any]]:
    data = json.loads(out or "[]")
    return data if isinstance(data, list) else []


def verify(att: Attachment) -> list[str]:
    """What differs from the intended attachment (empty when all is in place)."""
    problems: list[str] = []
    host = ip_cmd(att.host_netns)
    try:
        links = _json(_run([*host, "-j", "link", "show", "dev", att.host_if]))
    except LinkError:
        return [f"host interface {att.host_if} is missing"]
    if not links or "UP" not in links[0].get("flags", []):
        problems.append(f"host interface {att.host_if} is not up")
    routes = _json(_run([*host, "-j", "route", "show", f"{att.ip}/32", "proto", str(ROUTE_PROTO)]))
    if not any(r.get("dev") == att.host_if for r in routes):
        problems.append(f"no route {att.ip}/32 dev {att.host_if} proto {ROUTE_PROTO}")
    try:
        enter = [] if att.host_netns is None else ["nsenter", f"--net={att.host_netns}"]
        proxy_arp = _run([*enter, "sysctl", "-n", f"net.ipv4.conf.{att.host_if}.proxy_arp"]).strip()
    except LinkError:
        proxy_arp = "?"
    if proxy_arp != "1":
        problems.append(f"proxy_arp is not on for {att.host_if}")
    try:
        addrs = _json(_run([*ip_cmd(att.netns), "-j", "-4", "addr", "show", "dev", att.pod_if]))
        pod_routes = _json(_run([*ip_cmd(att.netns), "-j", "-4", "route", "show", "default"]))
    except LinkError as exc:
        return [*problems, f"pod interface {att.pod_if}: {exc}"]
    have = {f"{a.get('local')}/{a.get('prefixlen')}" for x in addrs for a in x.get("addr_info", [])}
    if f"{att.ip}/32" not in have:
        problems.append(f"pod interface {att.pod_if} lacks {att.ip}/32 (has {', '.join(sorted(have)) or 'none'})")
    if not any(r.get("gateway") == GATEWAY for r in pod_routes):
        problems.append(f"pod has no default route via {GATEWAY}")
    return problems
