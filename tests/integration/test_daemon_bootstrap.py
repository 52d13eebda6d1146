"""Node registration against a real etcd: the record created, an operator's fields kept through a re-registration,
the agent's AS option winning, a write racing ours (made between our read and our compare-and-swap) kept and ours
retried on top of it, and the tunnel address and VTEP MAC a VXLAN pool needs."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from collections.abc import Iterator

import pytest

from agent.calc.routes import vtep_mac
from daemon.autodetect import Detected
from daemon.bootstrap import RegistrationError, register_node
from datastore import keys as k
from datastore import model as m
from datastore.etcd import EtcdClient
from datastore.store import Store
from ipam.allocator import tunnel_handle
from ipam.pools import add_pool
from testbed.etcd_server import EtcdServer

pytestmark = pytest.mark.integration


def detected(address: str, interface: str = "eth0") -> Detected:
    return Detected(ipaddress.IPv4Interface(address), interface, "first-found", "test")


def record(etcd: EtcdClient, name: str = "n1") -> dict[str, object]:
    kv = etcd.get(k.NodeKey(name).path)
    assert kv is not None
    doc: dict[str, object] = json.loads(kv.value)
    return doc


class RacingClient(EtcdClient):
    """An etcd client whose next ``races`` compare-and-swaps each find that an operator changed the record after
    it was read (the operator's write happens between our read and our write)."""

    def __init__(self, endpoint: str, races: int) -> None:
        super().__init__([endpoint])
        self.races = races
        self.operator = EtcdClient([endpoint])
        self.cas_calls = 0

    def cas(self, key: str, value: bytes, mod_revision: int, lease: int = 0) -> int:
        self.cas_calls += 1
        if self.races > 0:
            self.races -= 1
            store = Store(self.operator)
            got = store.get(k.NodeKey("n1"), m.Node)
            assert got is not None
            labels = {**got.value.labels, f"race{self.races}": "yes"}
            store.put(dataclasses.replace(got.value, labels=labels))
        return super().cas(key, value, mod_revision, lease)

    def close(self) -> None:
        self.operator.close()
        super().close()


@pytest.fixture
def racing(etcd: EtcdClient, etcd_server: EtcdServer) -> Iterator[RacingClient]:
    client = RacingClient(etcd_server.endpoint, races=2)
    try:
        yield client
    finally:
        client.close()


def test_first_registration_creates_the_record(etcd: EtcdClient) -> None:
    reg = register_node(etcd, "n1", detected("192.168.77.10/24"), None)
    assert reg.created and reg.written == ("ip 192.168.77.10/24",)
    assert record(etcd) == {"name": "n1", "ip": "192.168.77.10/24", "labels": {}}
    assert reg.describe() == "node n1 record created; set ip 192.168.77.10/24"


def test_operator_fields_survive_and_the_address_follows(etcd: EtcdClient) -> None:
    Store(etcd).put(m.Node("n1", "192.168.77.9/24", as_number=64600, rr_cluster_id="1.0.0.1", labels={"rack": "a"}))
    reg = register_node(etcd, "n1", detected("192.168.77.10/24"), None)
    assert not reg.created
    assert record(etcd) == {
        "name": "n1",
        "ip": "192.168.77.10/24",
        "asNumber": 64600,
        "routeReflectorClusterID": "1.0.0.1",
        "labels": {"rack": "a"},
    }
    assert "kept asNumber 64600, routeReflectorClusterID 1.0.0.1, labels rack=a" in reg.describe()
    # Registering again with the same address writes nothing (the revision stays).
    before = etcd.get(k.NodeKey("n1").path)
    again = register_node(etcd, "n1", detected("192.168.77.10/24"), None)
    assert again.written == () and again.describe().startswith("node n1 record unchanged")
    after = etcd.get(k.NodeKey("n1").path)
    assert before is not None and after is not None and after.mod_revision == before.mod_revision


def test_the_as_option_overrides_the_record(etcd: EtcdClient) -> None:
    Store(etcd).put(m.Node("n1", "192.168.77.10/24", as_number=64600, labels={"rack": "a"}))
    reg = register_node(etcd, "n1", detected("192.168.77.10/24"), 64700)
    assert reg.written == ("asNumber 64700 (was 64600)",)
    assert record(etcd)["asNumber"] == 64700 and record(etcd)["labels"] == {"rack": "a"}


def test_a_write_between_read_and_swap_is_kept_and_ours_retried(racing: RacingClient, etcd: EtcdClient) -> None:
    Store(etcd).put(m.Node("n1", "192.168.77.9/24", labels={"rack": "a"}))
    reg = register_node(racing, "n1", detected("192.168.77.10/24"), 64512, sleep=lambda _: None)
    assert reg.conflicts == 2 and racing.cas_calls == 3
    doc = record(etcd)
    # Both operator writes made while we were retrying are there, and so is ours.
    assert doc["labels"] == {"rack": "a", "race1": "yes", "race0": "yes"}
    assert doc["ip"] == "192.168.77.10/24" and doc["asNumber"] == 64512


def test_endless_races_give_up_with_a_clear_error(etcd: EtcdClient, etcd_server: EtcdServer) -> None:
    Store(etcd).put(m.Node("n1", "192.168.77.9/24"))
    client = RacingClient(etcd_server.endpoint, races=1000)
    try:
        with pytest.raises(RegistrationError, match="node n1: lost 10 compare-and-swap rounds"):
            register_node(client, "n1", detected("192.168.77.10/24"), None, sleep=lambda _: None)
    finally:
        client.close()


def test_a_vxlan_pool_gives_the_node_a_tunnel_address_and_a_vtep_mac(etcd: EtcdClient) -> None:
    add_pool(Store(etcd), m.IPPool("10.244.0.0/16", encapsulation="vxlan"))
    reg = register_node(etcd, "n1", detected("192.168.77.10/24"), None)
    address = reg.tunnels["vxlan"]
    assert ipaddress.ip_address(address) in ipaddress.ip_network("10.244.0.0/16")
    doc = record(etcd)
    assert doc["vxlanAddress"] == address
    assert doc["vxlanMAC"] == vtep_mac(m.Node("n1", "192.168.77.10/24"))
    handle = etcd.get(k.HandleKey(tunnel_handle("n1", "vxlan")).path)
    assert handle is not None and address in json.loads(handle.value)["ips"]
    # A new address later keeps the tunnel address, the MAC and the handle: nothing allocated twice.
    again = register_node(etcd, "n1", detected("192.168.77.20/24"), None)
    assert again.tunnels == {"vxlan": address}
    doc = record(etcd)
    assert doc["ip"] == "192.168.77.20/24" and doc["vxlanAddress"] == address
    assert doc["vxlanMAC"] == reg.node.vxlan_mac


def test_an_operator_mac_is_kept_and_no_pool_is_a_reported_problem(etcd: EtcdClient) -> None:
    Store(etcd).put(m.Node("n1", "192.168.77.10/24", vxlan_mac="02:aa:bb:cc:dd:ee"))
    add_pool(Store(etcd), m.IPPool("10.244.0.0/16", encapsulation="vxlan", disabled=True))
    reg = register_node(etcd, "n1", detected("192.168.77.10/24"), None)
    assert record(etcd)["vxlanMAC"] == "02:aa:bb:cc:dd:ee"
    assert reg.tunnels == {} and len(reg.problems) == 1
    assert reg.problems[0].startswith("no vxlan tunnel address: ")
    assert "problem: no vxlan tunnel address" in reg.describe()
