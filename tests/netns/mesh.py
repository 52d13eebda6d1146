"""Shared pieces of the mesh tests (no tests here): node namespaces with pods, their records in etcd, and one
``podnet-agent`` process per node (ExaBGP and its bridge run inside the node's namespace)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from datastore import model as m
from datastore.etcd import EtcdClient
from datastore.store import Store
from testbed.etcd_server import EtcdServer, free_port
from testbed.netns import NetnsBed, NodeNs, Pod, Underlay, kill_namespace_pids
from testbed.netns import sh as bed_sh
from testbed.procs import register_child, unregister_child
from testbed.wait import eventually

POOL = "10.244.0.0/16"
AGENT = str(Path(sys.executable).with_name("podnet-agent"))
OTHER_SUBNET_GW = "192.168.88.1"


def block_of(i: int) -> str:
    return f"10.244.{i}.0/26"


@dataclass
class Mesh:
    bed: NetnsBed
    etcd: EtcdClient
    server: EtcdServer
    workdir: Path
    encapsulation: str
    nodes: dict[str, NodeNs] = field(default_factory=dict)
    pods: dict[str, Pod] = field(default_factory=dict)  # node name -> its pod
    runners: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    runner_args: tuple[str, ...] = ()  # podnet-agent's options
    health_ports: dict[str, int] = field(default_factory=dict)

    def routes(self, node: str) -> list[str]:
        out = self.nodes[node].ns.ip("route", "show", "proto", "80")
        return [line.strip() for line in out.splitlines()]

    def start(self, name: str) -> None:
        """The node's ``podnet-agent`` as the router only (``--no-run-firewall --no-run-cni``: these tests are about
        routes; the policy writer would isolate the pods, whose pod records they do not write)."""
        node = self.nodes[name]
        port = self.health_ports.setdefault(name, free_port())
        log = open(self.workdir / f"runner-{name}.log", "a")  # noqa: SIM115 - the child writes it until it exits
        proc = subprocess.Popen(
            [
                AGENT,
                "--node-name",
                name,
                "--netns",
                node.ns.name,
                "--etcd-endpoints",
                self.server.endpoint,
                "--workdir",
                str(self.workdir / name),
                "--health-bind",
                f"127.0.0.1:{port}",
                "--no-run-firewall",
                "--no-run-cni",
                *self.runner_args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        log.close()
        register_child(proc.pid)
        self.runners[name] = proc

    def kill(self, name: str) -> None:
        """The node's agent and its ExaBGP die at once (SIGKILL, no goodbye)."""
        proc = self.runners.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        unregister_child(proc.pid)
        kill_namespace_pids(self.nodes[name].ns.name)  # ExaBGP and the bridge run in the node's namespace

    def stop(self, name: str, timeout: float = 20.0) -> None:
        """A planned stop (SIGTERM): the runner stops ExaBGP without a NOTIFICATION (graceful restart)."""
        proc = self.runners.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(f"runner {name} did not stop within {timeout}s") from None
        finally:
            unregister_child(proc.pid)

    def close(self) -> None:
        for name in list(self.runners):
            self.kill(name)

    def log(self, name: str) -> str:
        with contextlib.suppress(OSError):
            return (self.workdir / f"runner-{name}.log").read_text()[-4000:]
        return ""


def make_mesh(
    bed: NetnsBed,
    etcd: EtcdClient,
    server: EtcdServer,
    workdir: Path,
    encapsulation: str,
    *,
    names: Iterable[str] = ("n1", "n2", "n3"),
    runner_args: Iterable[str] = (),
    cross_subnet: bool = False,
    routed: Iterable[str] = (),
) -> Mesh:
    """Nodes n<i> at 192.168.77.1<i> with block 10.244.<i>.0/26, a pod at 10.244.<i>.2 each, all in etcd.
    Nodes named in ``routed`` sit on another subnet (192.168.88.0/24) behind the underlay's router."""
    mesh = Mesh(bed, etcd, server, workdir, encapsulation, runner_args=tuple(runner_args))
    ul = bed.underlay()
    store = Store(etcd)
    store.put(m.ClusterConfig(encapsulation=encapsulation))
    store.put(m.IPPool(POOL, encapsulation=encapsulation, cross_subnet=cross_subnet))
    other = set(routed)
    if other:
        ul.ns.ip("addr", "add", f"{OTHER_SUBNET_GW}/24", "dev", ul.bridge)
        ul.ns.sysctl("net.ipv4.ip_forward", "1")
    for name in names:
        i = int(name[1:])
        node = routed_node(bed, ul, name, f"192.168.88.{10 + i}/24") if name in other else bed.node(name, ul, 10 + i)
        mesh.nodes[name] = node
        pod = bed.pod(node, "default", f"pod{i}", f"10.244.{i}.2")
        mesh.pods[name] = pod
        store.put(m.Node(name, node.ip, vxlan_address=f"10.244.{i}.1"))
        store.put(m.Block(block_of(i), affinity=f"node:{name}"))
        store.put(m.Endpoint(name, "default", f"pod{i}", "eth0", pod.host_iface, ips=(f"{pod.ip}/32",)))
    return mesh


def routed_node(bed: NetnsBed, ul: Underlay, name: str, address: str) -> NodeNs:
    """A node on the second subnet: same bridge, but reached from the first subnet only through the router."""
    ns = bed.netns(name)
    port = f"p-{name}"[:15]
    bed_sh("ip", "link", "add", "eth0", "netns", ns.name, "type", "veth", "peer", "name", port, "netns", ul.ns.name)
    ul.ns.ip("link", "set", port, "master", ul.bridge, "up")
    ns.ip("link", "set", "eth0", "up")
    ns.ip("addr", "add", address, "dev", "eth0")
    ns.ip("route", "add", "default", "via", OTHER_SUBNET_GW)
    ns.sysctl("net.ipv4.ip_forward", "1")
    return NodeNs(name, ns, address)


def wait_for(pred: object, timeout: float, what: str, mesh: Mesh | None = None) -> float:
    """Seconds it took; fails with the runners' logs when it does not happen."""
    assert callable(pred)
    t0 = time.monotonic()
    if not eventually(pred, timeout=timeout, interval=0.05):
        logs = "\n".join(f"--- {n}\n{mesh.log(n)}" for n in mesh.nodes) if mesh is not None else ""
        raise AssertionError(f"timed out after {timeout}s: {what}\n{logs}")
    return time.monotonic() - t0
