"""Status writes never delay the dataplane: a node runner (real ExaBGP, etcd, kernel) learns routes from a BIRD
router; while etcd is hung (SIGSTOP) or gone (killed), a route the router withdraws leaves the node's kernel as fast
as with etcd up (measured with ``ip monitor route``), and the status in etcd catches up once etcd is back. The
cluster config's log level reaches the runner's log."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from datastore import keys as k
from datastore import model as m
from datastore.etcd import EtcdClient
from datastore.store import Store
from testbed.etcd_server import EtcdServer
from testbed.netns import Netns, NetnsBed, Underlay
from tests.netns.mesh import Mesh, make_mesh, wait_for
from tests.netns.test_bgp_support import Bird, BirdPeer

pytestmark = pytest.mark.netns

ROUTER_AS = 64600
HOLD = 3
X = "198.51.100.0/24"  # withdrawn in each round
Y = "203.0.113.0/24"  # announced just before, so the runner has status to write when X goes
Z = "192.0.2.0/24"  # learned while etcd is hung, withdrawn while it is gone: the status must follow
SLACK = 1.0  # seconds a withdrawal with etcd away may take beyond the one with etcd up


class RouteMonitor:
    """``ip monitor route`` in a namespace, each line stamped when it arrives (no polling gaps)."""

    def __init__(self, ns: Netns) -> None:
        self.proc = ns.popen("ip", "monitor", "route")
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        time.sleep(0.2)  # the monitor is subscribed before the first measurement

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append((time.monotonic(), line.strip()))

    def deleted_at(self, cidr: str, after: float) -> float | None:
        with self._lock:
            for at, line in self.lines:
                if at >= after and line.startswith("Deleted") and f" {cidr} " in f" {line} ":
                    return at
        return None


def _has(mesh: Mesh, cidr: str) -> bool:
    return any(r.startswith(f"{cidr} ") for r in mesh.routes("n1"))


def _route_status(etcd: EtcdClient) -> set[str]:
    return {v.value.cidr for v in Store(etcd).list(k.routes_prefix("n1"), m.RouteStatus)}


def _agentctl_status(server: EtcdServer) -> str:
    cmd = [sys.executable, "-m", "agent.ctl.main", "--etcd-endpoints", server.endpoint, "status", "--node", "n1"]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30).stdout


@pytest.fixture
def mesh(netns_bed: NetnsBed, etcd: EtcdClient, etcd_server: EtcdServer, tmp_path: Path) -> Iterator[Mesh]:
    mesh = make_mesh(netns_bed, etcd, etcd_server, tmp_path, "none", names=("n1",))
    try:
        yield mesh
    finally:
        mesh.close()


def test_a_withdrawal_reaches_the_kernel_as_fast_with_etcd_hung_or_gone(
    mesh: Mesh, etcd: EtcdClient, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    bed = mesh.bed
    [ul_ns] = [ns for ns in bed.namespaces if ns.name.endswith("-ul")]
    router = bed.node("x", Underlay(ul_ns, ipaddress.IPv4Network("192.168.77.0/24")), 30)
    bird = Bird(bed, router, router.address, ROUTER_AS, tmp_path / "bird")
    peers = [BirdPeer(mesh.nodes["n1"].address, 64512)]
    bird.configure(peers, static=[X], hold=HOLD)
    Store(etcd).put(m.BGPPeer("tor", router.address, ROUTER_AS, hold_time=HOLD, graceful_restart_time=0,
                              accept_routes=True))  # fmt: skip
    mesh.start("n1")
    wait_for(lambda: _has(mesh, X), 60, f"{X} on n1", mesh)
    monitor = RouteMonitor(mesh.nodes["n1"].ns)

    def withdrawal_round(also: tuple[str, ...] = ()) -> float:
        """Y is announced (a pass with a route status to write), then X is withdrawn: seconds until X has left
        the kernel. Ends with X back and Y gone; ``also`` stays announced throughout."""
        bird.configure(peers, static=[X, Y, *also], hold=HOLD)
        wait_for(lambda: _has(mesh, Y), 30, f"{Y} on n1", mesh)
        time.sleep(0.3)  # the pass that programmed Y is now writing its status
        t0 = time.monotonic()
        bird.configure(peers, static=[Y, *also], hold=HOLD)
        wait_for(lambda: monitor.deleted_at(X, t0) is not None, 30, f"{X} deleted on n1", mesh)
        took = monitor.deleted_at(X, t0)
        assert took is not None
        bird.configure(peers, static=[X, *also], hold=HOLD)
        wait_for(lambda: _has(mesh, X) and not _has(mesh, Y), 30, f"{X} back, {Y} gone on n1", mesh)
        return took - t0

    def status_shows(cidrs: set[str]) -> None:
        wait_for(lambda: _route_status(etcd) >= cidrs and Y not in _route_status(etcd), 20, f"status {cidrs}", mesh)

    times: dict[str, list[float]] = {"etcd up": [], "etcd SIGSTOPped": [], "etcd killed": []}

    def as_fast_as_with_etcd_up(what: str) -> None:
        report = ", ".join(f"{w}: {' / '.join(f'{t * 1000:.0f} ms' for t in ts)}" for w, ts in times.items() if ts)
        print(f"\nwithdrawal -> kernel on n1: {report}")
        assert max(times[what]) <= max(times["etcd up"]) + SLACK, f"slower with {what}: {report}"

    assert etcd_server.proc is not None
    pid = etcd_server.proc.pid
    try:
        for _ in range(2):
            times["etcd up"].append(withdrawal_round())
        status_shows({X})

        os.kill(pid, signal.SIGSTOP)  # hung: connections are accepted, nothing is answered
        try:
            for _ in range(2):
                times["etcd SIGSTOPped"].append(withdrawal_round(also=(Z,)))
            time.sleep(6)  # longer than a request's deadline: the status writer has failed by now
        finally:
            os.kill(pid, signal.SIGCONT)
        as_fast_as_with_etcd_up("etcd SIGSTOPped")
        status_shows({X, Z})  # what happened while etcd was hung is there once it answers

        etcd_server.kill()  # gone: connections are refused
        try:
            for _ in range(2):
                times["etcd killed"].append(withdrawal_round())
        finally:
            etcd_server.start()
        as_fast_as_with_etcd_up("etcd killed")
        wait_for(lambda: Z not in _route_status(etcd), 20, f"{Z} gone from the status", mesh)
        status_shows({X})
        # The status is complete again and operators see it: the router's session, the node in sync.
        out = _agentctl_status(etcd_server)
        assert "in sync" in out and "NOT in sync" not in out, out
        assert any(router.address in line and "Established" in line for line in out.splitlines()), out
    finally:
        if bird.proc is not None:
            bed.stop_process(bird.proc)
        bed.stop_process(monitor.proc)


def test_the_cluster_log_level_reaches_the_runner_unless_a_flag_fixed_it(
    mesh: Mesh, etcd: EtcdClient, tmp_path: Path
) -> None:
    store = Store(etcd)
    mesh.start("n1")
    wait_for(lambda: store.get(k.AgentStatusKey("n1"), m.AgentStatus) is not None, 30, "n1 running", mesh)
    assert " DEBUG " not in mesh.log("n1")

    store.put(m.ClusterConfig(encapsulation="none", log_level="debug"))
    wait_for(lambda: " DEBUG " in mesh.log("n1"), 15, "debug lines in n1's log", mesh)

    store.put(m.ClusterConfig(encapsulation="none", log_level="warning"))
    wait_for(lambda: "podnet log level: WARNING" in mesh.log("n1"), 15, "back from debug", mesh)
    size = len((tmp_path / "runner-n1.log").read_text())
    store.put(m.Block("10.244.9.0/26", affinity="node:n1"))  # a pass that would log at info and debug
    wait_for(lambda: "blackhole 10.244.9.0/26" in mesh.routes("n1"), 15, "the new block programmed", mesh)
    time.sleep(0.5)
    later = (tmp_path / "runner-n1.log").read_text()[size:]
    assert " DEBUG " not in later and " INFO " not in later, later

    # A level given on the command line wins over the cluster's.
    mesh.stop("n1")
    mesh.runner_args = ("--log-level", "info")
    store.put(m.ClusterConfig(encapsulation="none", log_level="debug"))
    size = len((tmp_path / "runner-n1.log").read_text())
    mesh.start("n1")
    wait_for(lambda: "blackhole 10.244.9.0/26" in mesh.routes("n1"), 15, "n1 back", mesh)
    store.put(m.Block("10.244.10.0/26", affinity="node:n1"))
    wait_for(lambda: "blackhole 10.244.10.0/26" in mesh.routes("n1"), 15, "another block programmed", mesh)
    time.sleep(0.5)
    later = (tmp_path / "runner-n1.log").read_text()[size:]
    assert " INFO " in later and " DEBUG " not in later, later
