"""crossSubnet with VXLAN, end to end: n1 and n2 share a subnet, n3 sits on another one behind a router. Each
node's runner (real ExaBGP, real kernel) routes same-subnet blocks directly and encapsulates only towards the other
subnet; pods reach each other both ways, and only the cross-subnet traffic goes through the tunnel."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from datastore.etcd import EtcdClient
from testbed.etcd_server import EtcdServer
from testbed.netns import NetnsBed
from tests.netns.mesh import Mesh, block_of, make_mesh, wait_for

pytestmark = pytest.mark.netns

NAMES = ("n1", "n2", "n3")


@pytest.fixture
def mesh(netns_bed: NetnsBed, etcd: EtcdClient, etcd_server: EtcdServer, tmp_path: Path) -> Iterator[Mesh]:
    mesh = make_mesh(netns_bed, etcd, etcd_server, tmp_path, "vxlan", cross_subnet=True, routed=("n3",))
    try:
        for name in NAMES:
            mesh.start(name)
        yield mesh
    finally:
        mesh.close()


def vxlan_tx(mesh: Mesh, node: str) -> int:
    link = json.loads(mesh.nodes[node].ns.ip("-j", "-s", "link", "show", "dev", "vxlan.podnet"))[0]
    return int(link["stats64"]["tx"]["packets"])


def test_cross_subnet_encapsulates_only_towards_the_other_subnet(mesh: Mesh) -> None:
    n1, n2, n3 = (mesh.nodes[n].address for n in NAMES)
    expected = {
        "n1": [f"{block_of(2)} via {n2} dev eth0", f"{block_of(3)} via 10.244.3.1 dev vxlan.podnet onlink"],
        "n2": [f"{block_of(1)} via {n1} dev eth0", f"{block_of(3)} via 10.244.3.1 dev vxlan.podnet onlink"],
        "n3": [
            f"{block_of(1)} via 10.244.1.1 dev vxlan.podnet onlink",
            f"{block_of(2)} via 10.244.2.1 dev vxlan.podnet onlink",
        ],
    }
    for me, wanted in expected.items():
        wait_for(lambda me=me, wanted=wanted: all(w in mesh.routes(me) for w in wanted), 60, f"{me}: {wanted}", mesh)
    assert n3.startswith("192.168.88.")

    before = vxlan_tx(mesh, "n1")
    assert mesh.pods["n1"].ns.ping(mesh.pods["n2"].ip, count=3)
    assert vxlan_tx(mesh, "n1") == before  # same subnet: not through the tunnel
    assert mesh.pods["n1"].ns.ping(mesh.pods["n3"].ip, count=3)
    assert vxlan_tx(mesh, "n1") >= before + 3  # other subnet: encapsulated
    mesh.pods["n3"].ns.listen("tcp", 8080)
    assert mesh.pods["n2"].ns.connect("tcp", mesh.pods["n3"].ip, 8080)
    assert mesh.pods["n3"].ns.ping(mesh.pods["n1"].ip)
