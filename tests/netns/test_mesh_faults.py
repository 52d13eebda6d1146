"""Faults in a 3-node mesh run by ``agent.router``: a node that dies has its routes withdrawn elsewhere within
the BGP hold time; a planned agent restart with graceful restart removes no route anywhere (kernel tables watched
continuously while it happens)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from datastore import keys as k
from datastore import model as m
from datastore.etcd import EtcdClient
from datastore.store import Store
from testbed.etcd_server import EtcdServer
from testbed.netns import NetnsBed
from tests.netns.mesh import Mesh, block_of, make_mesh, wait_for

pytestmark = pytest.mark.netns

NAMES = ("n1", "n2", "n3")
HOLD = 9
STATUS_TTL = 3


def has_route(mesh: Mesh, node: str, cidr: str) -> bool:
    return any(line.startswith(f"{cidr} ") for line in mesh.routes(node))


def wait_converged(mesh: Mesh) -> None:
    for me in NAMES:
        for other in NAMES:
            if other != me:
                cidr = block_of(int(other[1:]))
                wait_for(lambda me=me, cidr=cidr: has_route(mesh, me, cidr), 60, f"{cidr} on {me}", mesh)


def test_a_dead_nodes_routes_are_withdrawn_within_the_hold_time(
    netns_bed: NetnsBed, etcd: EtcdClient, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    args = ("--bgp-hold-time", str(HOLD), "--bgp-graceful-restart-time", "0", "--status-ttl", str(STATUS_TTL))
    mesh = make_mesh(netns_bed, etcd, etcd_server, tmp_path, "none", runner_args=args)
    try:
        for name in NAMES:
            mesh.start(name)
        wait_converged(mesh)

        # n3's agent and ExaBGP are killed: their TCP sessions close, peers withdraw at once.
        mesh.kill("n3")
        took = wait_for(
            lambda: not has_route(mesh, "n1", block_of(3)) and not has_route(mesh, "n2", block_of(3)),
            HOLD,
            "n3's block withdrawn on n1 and n2",
            mesh,
        )
        assert took < HOLD
        assert has_route(mesh, "n1", block_of(2))  # nothing else moved

        # What n3 said about itself was bound to its lease: gone within the TTL; agentctl says it is not running.
        def n3_status_gone() -> bool:
            kvs, _ = etcd.get_prefix(k.routes_prefix("n3"))
            return not kvs and etcd.get(k.AgentStatusKey("n3").path) is None

        wait_for(n3_status_gone, STATUS_TTL + 3, "n3's status keys expire with its lease", mesh)
        ctl = subprocess.run(
            [
                sys.executable,
                "-m",
                "agent.ctl.main",
                "--etcd-endpoints",
                etcd_server.endpoint,
                "status",
                "--node",
                "n3",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert ctl.returncode == 1 and "is not running" in ctl.stdout
        assert etcd.get(k.AgentStatusKey("n1").path) is not None  # the living keep theirs

        # n2 vanishes from the network first, then dies: nothing tells n1; its hold timer must.
        mesh.bed.namespaces[0].ip("link", "set", "p-n2", "down")  # n2's port on the underlay bridge
        mesh.kill("n2")
        t0 = time.monotonic()
        wait_for(lambda: not has_route(mesh, "n1", block_of(2)), HOLD + 3, "n2's block withdrawn on n1", mesh)
        took = time.monotonic() - t0
        assert took <= HOLD + 1.0, f"withdrawn after {took:.1f}s, hold time {HOLD}s"
    finally:
        mesh.close()


class RouteTableSampler:
    """Samples kernel tables and a peer state every few milliseconds in the background."""

    def __init__(self, check: Callable[[], list[str]]) -> None:
        self.check = check
        self.problems: list[str] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.problems.extend(self.check())
            self.samples += 1
            self._stop.wait(0.02)

    def __enter__(self) -> RouteTableSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_a_graceful_agent_restart_removes_no_route_on_any_node(
    netns_bed: NetnsBed, etcd: EtcdClient, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    mesh = make_mesh(netns_bed, etcd, etcd_server, tmp_path, "vxlan", runner_args=("--bgp-hold-time", str(HOLD)))
    store = Store(etcd)
    n3_ip = mesh.nodes["n3"].address
    try:
        for name in NAMES:
            mesh.start(name)
        wait_converged(mesh)
        seen_states: set[str] = set()

        def check() -> list[str]:
            out = []
            for me in NAMES:
                table = mesh.routes(me)
                for other in NAMES:
                    cidr = block_of(int(other[1:]))
                    if other != me and not any(line.startswith(f"{cidr} ") for line in table):
                        out.append(f"{cidr} missing on {me} at {time.monotonic():.3f}")
            st = store.get(k.BGPPeerStatusKey("n1", n3_ip), m.BGPPeerStatus)
            seen_states.add(st.value.state if st is not None else "absent")
            return out

        with RouteTableSampler(check) as sampler:
            mesh.stop("n3")  # SIGTERM: a planned restart (ExaBGP goes without a NOTIFICATION)
            wait_for(lambda: seen_states - {"Established"} != set(), 10, "n1 saw the session to n3 drop", mesh)
            mesh.start("n3")

            def n3_back() -> bool:
                st = store.get(k.BGPPeerStatusKey("n1", n3_ip), m.BGPPeerStatus)
                agent = store.get(k.AgentStatusKey("n3"), m.AgentStatus)
                return st is not None and st.value.state == "Established" and agent is not None

            wait_for(n3_back, 30, "n3 back and established with n1", mesh)
            time.sleep(3)  # End-of-RIB, stale sweeps and n3's own BGP settle time all pass inside the watch
        assert sampler.samples > 20  # every ~0.1 s over the whole restart
        assert sampler.problems == [], (sampler.problems[:3], sampler.problems[-3:], len(sampler.problems))
        assert seen_states - {"Established"}, "the session to n3 never dropped: graceful restart was not exercised"
        for a in NAMES:
            for b in NAMES:
                if a != b:
                    assert mesh.pods[a].ns.ping(mesh.pods[b].ip), f"{a} -> {b} after the restart"
    finally:
        mesh.close()
