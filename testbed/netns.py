"""Network-namespace test hosts: an underlay bridge, "node" namespaces on it, "pod" namespaces joined to a node.

Nothing here touches the root namespace: the bridge lives in its own namespace and every veth is created directly
inside the namespaces it joins. Names carry a per-run id, so parallel or aborted runs never collide, and
``NetnsBed.close()`` deletes everything the bed created (call it from ``finally`` or use it as a context manager).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from testbed.procs import register_child, unregister_child

RUN_PREFIX = "pnt"  # every namespace the test bed creates starts with this


def sh(*cmd: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def list_netns() -> list[str]:
    out = sh("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def cali_name(namespace: str, pod: str) -> str:
    """Host-side veth name for a pod, as podnet's CNI names it: cali + 11 hex of sha1("<ns>.<pod>")."""
    return "cali" + hashlib.sha1(f"{namespace}.{pod}".encode()).hexdigest()[:11]


@dataclass
class Netns:
    name: str
    bed: NetnsBed = field(repr=False)

    def run(self, *cmd: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.name, *cmd, check=check, timeout=timeout)

    def ip(self, *args: str, check: bool = True) -> str:
        return sh("ip", "-n", self.name, *args, check=check).stdout

    def sysctl(self, key: str, value: str) -> None:
        self.run("sysctl", "-qw", f"{key}={value}")

    def popen(self, *cmd: str) -> subprocess.Popen[str]:
        """Start a long-running process inside the namespace; the bed kills it on close."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.name, *cmd],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        register_child(proc.pid)
        self.bed.processes.append(proc)
        return proc

    def listen(self, proto: str, port: int, host: str = "0.0.0.0") -> ProbeServer:
        """A TCP or UDP probe server answering every connection or datagram."""
        proc = self.popen(sys.executable, "-m", "testbed.probe", "serve", proto, host, str(port))
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "ready":
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"probe server in {self.name} failed to start: {line!r} {err}")
        return ProbeServer(proc, self.bed)

    def connect(self, proto: str, host: str, port: int, timeout: float = 1.0) -> bool:
        """True if a TCP connection (or a UDP request/answer) to host:port succeeds from this namespace."""
        proc = self.run(
            sys.executable,
            "-m",
            "testbed.probe",
            "connect",
            proto,
            host,
            str(port),
            str(timeout),
            check=False,
            timeout=timeout + 20,
        )
        return proc.returncode == 0

    def ping(self, host: str, count: int = 1, timeout: float = 1.0) -> bool:
        proc = self.run("ping", "-n", "-q", "-c", str(count), "-W", str(timeout), host, check=False)
        return proc.returncode == 0


@dataclass
class ProbeServer:
    proc: subprocess.Popen[str]
    bed: NetnsBed = field(repr=False)

    def stop(self) -> None:
        self.bed.stop_process(self.proc)


@dataclass
class Underlay:
    """A bridge in a namespace of its own, standing in for the nodes' L2 network."""

    ns: Netns
    subnet: ipaddress.IPv4Network
    bridge: str = "br0"

    @property
    def gateway(self) -> str:
        return str(self.subnet.network_address + 1)


@dataclass
class NodeNs:
    """A node's network namespace in the test bed (not the datastore's ``datastore.model.Node`` record)."""

    name: str
    ns: Netns
    ip: str  # underlay address/prefix
    iface: str = "eth0"

    @property
    def address(self) -> str:
        return str(ipaddress.ip_interface(self.ip).ip)


@dataclass
class Pod:
    namespace: str
    name: str
    ns: Netns
    node: NodeNs
    ip: str
    host_iface: str


class NetnsBed:
    def __init__(self, run_id: str | None = None) -> None:
        self.run_id = run_id or secrets.token_hex(3)
        self.prefix = f"{RUN_PREFIX}{self.run_id}"
        self.namespaces: list[Netns] = []
        self.processes: list[subprocess.Popen[str]] = []
        self._port = 0

    def __enter__(self) -> NetnsBed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def netns(self, role: str) -> Netns:
        name = f"{self.prefix}-{role}"
        sh("ip", "netns", "add", name)
        ns = Netns(name, self)
        self.namespaces.append(ns)
        ns.ip("link", "set", "lo", "up")
        return ns

    def underlay(self, subnet: str = "192.168.77.0/24", mtu: int = 1500) -> Underlay:
        ns = self.netns("ul")
        ns.ip("link", "add", "br0", "type", "bridge")
        ns.ip("link", "set", "br0", "mtu", str(mtu), "up")
        net = ipaddress.IPv4Network(subnet)
        # The bridge holds the subnet's first address: the nodes' default gateway, as on a real network. Nodes
        # need a default route for proxy ARP to answer the pods' 169.254.1.1 (the kernel only proxies for
        # destinations it can route out another interface).
        ns.ip("addr", "add", f"{net.network_address + 1}/{net.prefixlen}", "dev", "br0")
        return Underlay(ns, net)

    def node(self, name: str, underlay: Underlay, host: int, mtu: int = 1500) -> NodeNs:
        """A node namespace with ``eth0`` on the underlay bridge at the subnet's ``host``-th address."""
        ns = self.netns(name)
        addr = f"{underlay.subnet.network_address + host}/{underlay.subnet.prefixlen}"
        port = f"p-{name}"[:15]
        sh(
            "ip",
            "link",
            "add",
            "eth0",
            "netns",
            ns.name,
            "type",
            "veth",
            "peer",
            "name",
            port,
            "netns",
            underlay.ns.name,
        )
        underlay.ns.ip("link", "set", port, "master", underlay.bridge, "mtu", str(mtu), "up")
        ns.ip("link", "set", "eth0", "mtu", str(mtu), "up")
        ns.ip("addr", "add", addr, "dev", "eth0")
        ns.ip("route", "add", "default", "via", underlay.gateway)
        ns.sysctl("net.ipv4.ip_forward", "1")
        return NodeNs(name, ns, addr)

    def pod(self, node: NodeNs, namespace: str, name: str, ip: str, mtu: int = 1450) -> Pod:
        """A pod namespace wired to ``node`` the way podnet's CNI does it (veth, /32, proxy-ARP gateway)."""
        ns = self.netns(f"{node.name}-{name}"[:40])
        host_if = cali_name(namespace, name)
        sh(
            "ip",
            "link",
            "add",
            host_if,
            "netns",
            node.ns.name,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name,
        )
        node.ns.ip("link", "set", host_if, "mtu", str(mtu), "up")
        node.ns.sysctl(f"net.ipv4.conf.{host_if}.proxy_arp", "1")
        node.ns.sysctl(f"net.ipv4.neigh.{host_if}.proxy_delay", "0")
        node.ns.sysctl(f"net.ipv4.conf.{host_if}.forwarding", "1")
        node.ns.ip("route", "add", f"{ip}/32", "dev", host_if)
        ns.ip("link", "set", "eth0", "mtu", str(mtu), "up")
        ns.ip("addr", "add", f"{ip}/32", "dev", "eth0")
        ns.ip("route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
        ns.ip("route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
        return Pod(namespace, name, ns, node, ip, host_if)

    def stop_process(self, proc: subprocess.Popen[str]) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        unregister_child(proc.pid)

    def close(self) -> None:
        errors: list[str] = []
        for proc in reversed(self.processes):
            try:
                self.stop_process(proc)
            except Exception as exc:
                errors.append(f"process {proc.pid}: {exc}")
        self.processes.clear()
        for ns in reversed(self.namespaces):
            kill_namespace_pids(ns.name)
            done = sh("ip", "netns", "delete", ns.name, check=False)
            if done.returncode != 0 and ns.name in list_netns():
                errors.append(f"netns {ns.name}: {done.stderr.strip()}")
        self.namespaces.clear()
        if errors:
            raise RuntimeError("test bed cleanup failed: " + "; ".join(errors))


def kill_namespace_pids(name: str) -> None:
    """Kill processes still running inside a namespace the bed created (they would keep it alive)."""
    out = sh("ip", "netns", "pids", name, check=False).stdout.split()
    for pid in out:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    deadline = time.monotonic() + 2
    while out and time.monotonic() < deadline:
        out = sh("ip", "netns", "pids", name, check=False).stdout.split()
        if out:
            time.sleep(0.05)


def leftover_namespaces(prefixes: Sequence[str]) -> list[str]:
    return [n for n in list_netns() if any(n.startswith(p) for p in prefixes)]


def leftover_root_links(prefixes: Sequence[str]) -> list[str]:
    """Links in the root namespace whose names start with a prefix (the bed never makes any there)."""
    out = sh("ip", "-o", "link", "show", check=False).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]
    return [n for n in names if any(n.startswith(p) for p in prefixes)]
