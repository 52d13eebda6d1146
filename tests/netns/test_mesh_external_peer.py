"""A global peer's own routes, used as configured: two node runners (real ExaBGP, etcd, kernel) peer with a BIRD
router that announces an outside network. Without ``acceptRoutes`` the nodes ignore it; with it every node routes
the network via the router (pods reach a host there), `agentctl routes` and etcd show it as ``external``, and a
withdrawal or turning ``acceptRoutes`` off again removes it from the kernels."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from datastore import keys as k
from datastore import model as m
from datastore.etcd import EtcdClient
from datastore.store import Store
from testbed.etcd_server import EtcdServer
from testbed.netns import NetnsBed, Underlay
from tests.netns.mesh import Mesh, block_of, make_mesh, wait_for
from tests.netns.test_bgp_support import Bird, BirdPeer

pytestmark = pytest.mark.netns

NAMES = ("n1", "n2")
OUTSIDE = "198.51.100.0/24"
OUTSIDE_HOST = "198.51.100.7"
ROUTER_AS = 64600


@pytest.fixture
def mesh(netns_bed: NetnsBed, etcd: EtcdClient, etcd_server: EtcdServer, tmp_path: Path) -> Iterator[Mesh]:
    mesh = make_mesh(netns_bed, etcd, etcd_server, tmp_path, "vxlan", names=NAMES)
    try:
        yield mesh
    finally:
        mesh.close()


def _external(mesh: Mesh, node: str) -> list[str]:
    return [r for r in mesh.routes(node) if r.startswith(OUTSIDE)]


def _agentctl(server: EtcdServer, *args: str) -> str:
    cmd = [sys.executable, "-m", "agent.ctl.main", "--etcd-endpoints", server.endpoint, *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def test_routes_of_a_global_peer_are_programmed_only_when_accepted(
    mesh: Mesh, etcd: EtcdClient, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    bed = mesh.bed
    [ul_ns] = [ns for ns in bed.namespaces if ns.name.endswith("-ul")]
    router = bed.node("x", Underlay(ul_ns, ipaddress.IPv4Network("192.168.77.0/24")), 30)
    router.ns.ip("addr", "add", f"{OUTSIDE_HOST}/32", "dev", "lo")
    for i, name in enumerate(NAMES, start=1):  # the way back to the pods (a router would learn it; BIRD here
        router.ns.ip("route", "add", block_of(i), "via", mesh.nodes[name].address)  # does not write its kernel)
    bird = Bird(bed, router, router.address, ROUTER_AS, tmp_path / "bird")
    bird.configure([BirdPeer(mesh.nodes[n].address, 64512) for n in NAMES], static=[OUTSIDE])
    store = Store(etcd)
    tor = m.BGPPeer("tor", router.address, ROUTER_AS, hold_time=3, graceful_restart_time=0)
    store.put(tor)
    for name in NAMES:
        mesh.start(name)
    listener = router.ns.listen("tcp", 8080)
    try:
        wait_for(lambda: {block_of(1), block_of(2)} <= set(bird.routes()), 60, "BIRD has both blocks", mesh)
        time.sleep(2)  # BIRD has been announcing the outside network all along: give a wrong pass time to show
        for name in NAMES:
            assert _external(mesh, name) == [], f"{name} programmed a route it was not configured to accept"
        assert not mesh.pods["n1"].ns.connect("tcp", OUTSIDE_HOST, 8080, timeout=0.5)

        store.put(replace(tor, accept_routes=True))
        want = f"{OUTSIDE} via {router.address} dev eth0"
        for name in NAMES:
            wait_for(lambda name=name: _external(mesh, name) == [want], 20, f"{name}: {want}", mesh)
        for name in NAMES:
            assert mesh.pods[name].ns.connect("tcp", OUTSIDE_HOST, 8080), f"pod on {name} -> outside host"
        wait_for(lambda: store.get(k.RouteKey("n1", OUTSIDE), m.RouteStatus) is not None, 10, "route status", mesh)
        st = store.get(k.RouteKey("n1", OUTSIDE), m.RouteStatus)
        assert st is not None
        assert (st.value.type, st.value.via, st.value.learned_from) == ("external", router.address, router.address)
        table = _agentctl(etcd_server, "routes", "--node", "n1")
        [line] = [ln for ln in table.splitlines() if OUTSIDE in ln]
        assert "external" in line.split() and router.address in line.split()
        # the pod blocks are still routed through VXLAN: the external route changed nothing else
        assert f"{block_of(2)} via 10.244.2.1 dev vxlan.podnet onlink" in mesh.routes("n1")

        bird.configure([BirdPeer(mesh.nodes[n].address, 64512) for n in NAMES], static=[])
        for name in NAMES:
            wait_for(lambda name=name: _external(mesh, name) == [], 20, f"{name}: withdrawn route removed", mesh)
        assert not mesh.pods["n1"].ns.connect("tcp", OUTSIDE_HOST, 8080, timeout=0.5)

        bird.configure([BirdPeer(mesh.nodes[n].address, 64512) for n in NAMES], static=[OUTSIDE])
        wait_for(lambda: _external(mesh, "n2") == [want], 20, "re-announced route back on n2", mesh)
        store.put(tor)  # acceptRoutes off again
        for name in NAMES:
            wait_for(lambda name=name: _external(mesh, name) == [], 20, f"{name}: no longer accepted", mesh)
    finally:
        listener.stop()
        if bird.proc is not None:
            bed.stop_process(bird.proc)
