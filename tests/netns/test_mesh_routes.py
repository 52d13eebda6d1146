"""Three nodes in a full BGP mesh, each run by ``agent.router`` (real ExaBGP, real etcd, real kernel routes):
every node's block reaches the others' kernels with the right next hop and device, pods talk across nodes, and
etcd and ``agentctl`` show what was programmed."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
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


@pytest.fixture(params=["vxlan", "none"])
def mesh(
    request: pytest.FixtureRequest, netns_bed: NetnsBed, etcd: EtcdClient, etcd_server: EtcdServer, tmp_path: Path
) -> Iterator[Mesh]:
    mesh = make_mesh(netns_bed, etcd, etcd_server, tmp_path, request.param)
    try:
        for name in NAMES:
            mesh.start(name)
        yield mesh
    finally:
        mesh.close()


def expected_route(mesh: Mesh, encapsulation: str, other: str) -> str:
    i = int(other[1:])
    if encapsulation == "vxlan":
        return f"{block_of(i)} via 10.244.{i}.1 dev vxlan.podnet onlink"
    return f"{block_of(i)} via {mesh.nodes[other].address} dev eth0"


def test_full_mesh_programs_every_block_everywhere_and_pods_talk(mesh: Mesh, etcd_server: EtcdServer) -> None:
    encapsulation = mesh.encapsulation
    for me in NAMES:
        wanted = [expected_route(mesh, encapsulation, o) for o in NAMES if o != me]
        wait_for(lambda me=me, wanted=wanted: all(w in mesh.routes(me) for w in wanted), 60, f"{me}: {wanted}", mesh)
        routes = mesh.routes(me)
        assert f"blackhole {block_of(int(me[1:]))}" in routes
        assert f"{mesh.pods[me].ip} dev {mesh.pods[me].host_iface} scope link" in routes

    for a in NAMES:
        for b in NAMES:
            if a != b:
                assert mesh.pods[a].ns.ping(mesh.pods[b].ip), f"{a} -> {b}"
    mesh.pods["n3"].ns.listen("tcp", 8080)
    assert mesh.pods["n1"].ns.connect("tcp", mesh.pods["n3"].ip, 8080)

    # What operators see: every node's routes in etcd (etcdctl), and the BGP peer table (agentctl).
    def routes_in_etcd() -> dict[str, dict[str, object]]:
        out = subprocess.run(
            ["etcdctl", f"--endpoints={etcd_server.endpoint}", "get", "--prefix", "/podnet/v1/routes/", "-w", "json"],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "ETCDCTL_API": "3"},
        ).stdout
        kvs = json.loads(out).get("kvs", [])
        return {base64.b64decode(kv["key"]).decode(): json.loads(base64.b64decode(kv["value"])) for kv in kvs}

    key = f"/podnet/v1/routes/n1/{block_of(2).replace('/', '-')}"
    wait_for(lambda: key in routes_in_etcd(), 15, "route status in etcd", mesh)
    stored = routes_in_etcd()
    assert len([k for k in stored if k.startswith("/podnet/v1/routes/n")]) == 3 * (3 + 1)  # 2 remote, 1 local, 1 pod
    st = stored[key]
    assert st["type"] == "remote-block" and st["encapsulation"] == encapsulation
    assert st["learnedFrom"] == mesh.nodes["n2"].address
    assert st["dev"] == ("vxlan.podnet" if encapsulation == "vxlan" else "eth0")

    def agentctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "agent.ctl.main",
                "--etcd-endpoints",
                etcd_server.endpoint,
                "--node-name",
                "n1",
                *args,
            ],
            capture_output=True,
            text=True,
            check=False,
        )

    def peers_up() -> bool:
        doc = json.loads(agentctl("status", "-o", "json").stdout or "{}")
        return [p.get("state") for p in doc.get("peers", [])] == ["Established", "Established"]

    wait_for(peers_up, 15, "agentctl status shows both peers Established", mesh)
    out = agentctl("status").stdout
    assert "in sync" in out and "AS number 64512, router ID 192.168.77.11" in out
    for other in ("n2", "n3"):
        row = next(line for line in out.splitlines() if line.startswith(mesh.nodes[other].address))
        assert "node-to-node mesh" in row and "Established" in row


def test_borrowed_addresses_and_invalid_peers(mesh: Mesh, etcd: EtcdClient, etcd_server: EtcdServer) -> None:
    """A pod on n2 holding an address of n1's block is reached through n2 from everywhere (its /32 beats the
    block); a node-specific peer that cannot work shows as Invalid with the reason and disturbs no session."""
    for me in NAMES:
        wanted = [expected_route(mesh, mesh.encapsulation, o) for o in NAMES if o != me]
        wait_for(lambda me=me, wanted=wanted: all(w in mesh.routes(me) for w in wanted), 60, f"{me}: {wanted}", mesh)
    store = Store(etcd)
    since = {p.value.peer_ip: p.value.since for p in store.list(k.bgp_status_prefix("n1"), m.BGPPeerStatus)}

    borrower = mesh.bed.pod(mesh.nodes["n2"], "default", "borrower", "10.244.1.9")
    store.put(m.Endpoint("n2", "default", "borrower", "eth0", borrower.host_iface, ips=("10.244.1.9/32",)))
    store.put(m.BGPPeer("selfie", mesh.nodes["n1"].address, 64600, node="n1"))

    for me in ("n1", "n3"):
        wait_for(lambda me=me: any(r.startswith("10.244.1.9 via") for r in mesh.routes(me)), 15, f"/32 on {me}", mesh)
    assert any(r.startswith("10.244.1.9 dev cali") for r in mesh.routes("n2"))
    assert "blackhole 10.244.1.0/26" in mesh.routes("n1")
    for me in ("n1", "n3"):
        assert mesh.pods[me].ns.ping(borrower.ip), f"{me} -> borrowed address on n2"
    st = store.get(k.RouteKey("n1", "10.244.1.9/32"), m.RouteStatus)
    assert st is not None and st.value.type == "borrowed" and st.value.learned_from == mesh.nodes["n2"].address

    def invalid_shown() -> bool:
        peer = store.get(k.BGPPeerStatusKey("n1", mesh.nodes["n1"].address), m.BGPPeerStatus)
        return peer is not None and peer.value.state == "Invalid"

    wait_for(invalid_shown, 15, "the invalid peer in n1's status", mesh)
    peer = store.get(k.BGPPeerStatusKey("n1", mesh.nodes["n1"].address), m.BGPPeerStatus)
    assert peer is not None and "this node's own address" in peer.value.info
    assert peer.value.peer_type == "node specific"

    # Peer records no session can be made from (undecodable values, a node that does not exist) are listed with
    # their reason in the agent's status and `agentctl status`, and disturb no session either.
    etcd.put(k.BGPPeerKey("bad-as").path, b'{"name": "bad-as", "peerIP": "192.168.77.99", "asNumber": 0}')
    long_password = json.dumps({"name": "long-key", "peerIP": "192.168.77.98", "asNumber": 64601, "password": "x" * 81})
    etcd.put(k.BGPPeerKey("long-key").path, long_password.encode())
    store.put(m.BGPPeer("ghost-peer", "192.168.77.97", 64602, node="ghost"))

    def problems() -> tuple[str, ...]:
        agent = store.get(k.AgentStatusKey("n1"), m.AgentStatus)
        return () if agent is None else agent.value.problems

    wait_for(lambda: sum(p.startswith("BGP peer ") for p in problems()) == 3, 15, "bad peers in n1's status", mesh)
    assert any(p.startswith("BGP peer bad-as: asNumber") for p in problems())
    assert any(p.startswith("BGP peer long-key: password") for p in problems())
    assert "BGP peer ghost-peer: node 'ghost' does not exist" in problems()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.ctl.main",
            "--etcd-endpoints",
            etcd_server.endpoint,
            "--node-name",
            "n1",
            "status",
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    assert "BGP peer bad-as: asNumber" in out and "BGP peer ghost-peer" in out
    now = {p.value.peer_ip: p.value for p in store.list(k.bgp_status_prefix("n1"), m.BGPPeerStatus)}
    for other in ("n2", "n3"):
        ip = mesh.nodes[other].address
        assert now[ip].state == "Established" and now[ip].since == since[ip]  # the mesh sessions never dropped
