"""IPAM against a real etcd: pools, block affinity, allocation, borrowing, exhaustion, release, tunnel addresses."""

from __future__ import annotations

import ipaddress
import re

import pytest

from datastore import keys as k
from datastore import model as m
from datastore.etcd import EtcdClient
from datastore.store import Store
from ipam.allocator import Ipam
from ipam.check import check
from ipam.errors import AddressInUse, InvalidRequest, NoPool, PoolExhausted, PoolInUse, PoolOverlap
from ipam.pools import add_pool, delete_pool, list_pools

pytestmark = pytest.mark.integration


def blocks(etcd: EtcdClient) -> dict[str, m.Block]:
    return {v.value.cidr: v.value for v in Store(etcd).list(k.BLOCKS_PREFIX, m.Block)}


def affinities(etcd: EtcdClient) -> set[tuple[str, str]]:
    return {(v.value.node, v.value.cidr) for v in Store(etcd).list(k.AFFINITY_PREFIX, m.Affinity)}


def test_overlapping_pools_are_refused(etcd: EtcdClient) -> None:
    store = Store(etcd)
    add_pool(store, m.IPPool("10.244.0.0/16"))
    with pytest.raises(PoolOverlap, match=re.escape("overlaps the existing pool 10.244.0.0/16")):
        add_pool(store, m.IPPool("10.244.8.0/24"))
    with pytest.raises(PoolOverlap):
        add_pool(store, m.IPPool("10.0.0.0/8"))
    add_pool(store, m.IPPool("10.245.0.0/16", block_size=28))
    assert [p.cidr for p in list_pools(store)] == ["10.244.0.0/16", "10.245.0.0/16"]


def test_node_claims_a_block_and_allocates_inside_it(etcd: EtcdClient) -> None:
    add_pool(Store(etcd), m.IPPool("10.244.0.0/16"))
    ipam = Ipam(etcd)
    a = ipam.auto_assign("h-a", "n1", pod="nsa/a")
    b = ipam.auto_assign("h-b", "n1", pod="nsa/b")
    c = ipam.auto_assign("h-c", "n2", pod="nsa/c")
    assert (a, b) == ("10.244.0.0", "10.244.0.1")
    assert c == "10.244.0.64"  # n2 claimed the next /26
    assert affinities(etcd) == {("n1", "10.244.0.0/26"), ("n2", "10.244.0.64/26")}
    got = blocks(etcd)["10.244.0.0/26"]
    assert got.affinity == "node:n1"
    assert got.allocations == {0: m.Allocation("h-a", "nsa/a"), 1: m.Allocation("h-b", "nsa/b")}
    handle = Store(etcd).get(k.HandleKey("h-a"), m.Handle)
    assert handle is not None and handle.value == m.Handle("h-a", ("10.244.0.0",), "nsa/a", "n1")
    # A repeated request for the same handle gets the same address (an ADD retried by the runtime).
    assert ipam.auto_assign("h-a", "n1", pod="nsa/a") == a
    assert Ipam(etcd).auto_assign("h-a", "n1", pod="nsa/a") == a


def test_release_by_handle_is_idempotent_and_frees_the_address(etcd: EtcdClient) -> None:
    add_pool(Store(etcd), m.IPPool("10.244.0.0/16"))
    ipam = Ipam(etcd)
    a = ipam.auto_assign("h-a", "n1")
    assert ipam.release_handle("h-a") == [a]
    assert ipam.release_handle("h-a") == []
    assert Store(etcd).get(k.HandleKey("h-a"), m.Handle) is None
    assert blocks(etcd)["10.244.0.0/26"].allocations == {}
    assert ipam.auto_assign("h-b", "n1") == a  # reused


def test_specific_address(etcd: EtcdClient) -> None:
    add_pool(Store(etcd), m.IPPool("10.244.0.0/16"))
    ipam = Ipam(etcd)
    assert ipam.assign_ip("10.244.3.7", "h-x", "n1", pod="nsa/x") == "10.244.3.7"
    assert ipam.assign_ip("10.244.3.7", "h-x", "n1", pod="nsa/x") == "10.244.3.7"
    with pytest.raises(AddressInUse, match="already allocated to h-x"):
        ipam.assign_ip("10.244.3.7", "h-y", "n1")
    with pytest.raises(InvalidRequest, match="not in any IP pool"):
        ipam.assign_ip("172.16.0.1", "h-y", "n1")
    assert ("n1", "10.244.3.0/26") in affinities(etcd)
    assert ipam.release_ip("10.244.3.7") == "h-x"
    assert Store(etcd).get(k.HandleKey("h-x"), m.Handle) is None


def test_small_pool_fills_borrows_then_exhausts_cleanly(etcd: EtcdClient) -> None:
    add_pool(Store(etcd), m.IPPool("10.250.0.0/28", block_size=30))
    ipam = Ipam(etcd)
    got = [ipam.auto_assign(f"n1-{i}", "n1") for i in range(12)]  # n1 claims three of the four /30 blocks
    got += [ipam.auto_assign(f"n2-{i}", "n2") for i in range(4)]  # n2 claims the last block
    assert sorted(got, key=ipaddress.ip_address) == [str(ipaddress.ip_address("10.250.0.0") + i) for i in range(16)]
    assert {b.affine_node for b in blocks(etcd).values()} == {"n1", "n2"}
    # Free one of n1's addresses: n2 has no free block left, so it borrows it (the block stays n1's).
    ipam.release_handle("n1-5")
    assert ipam.auto_assign("n2-borrow", "n2") == "10.250.0.5"
    assert blocks(etcd)["10.250.0.4/30"].affinity == "node:n1"
    before = {kv.key: kv.value for kv in etcd.get_prefix("/podnet/v1/")[0]}
    with pytest.raises(PoolExhausted, match=re.escape("every address in 10.250.0.0/28 is allocated")):
        ipam.auto_assign("n3-0", "n3")
    assert {kv.key: kv.value for kv in etcd.get_prefix("/podnet/v1/")[0]} == before  # nothing half-written
    assert check(etcd).problems == ()


def test_strict_affinity_refuses_to_borrow(etcd: EtcdClient) -> None:
    store = Store(etcd)
    add_pool(store, m.IPPool("10.250.0.0/28", block_size=30))
    store.put(m.ClusterConfig(strict_affinity=True))
    ipam = Ipam(etcd)
    for i in range(4):
        ipam.auto_assign(f"n{i}-0", f"n{i}")  # four nodes, one block each
    ipam.auto_assign("n0-1", "n0")
    with pytest.raises(PoolExhausted, match="strictAffinity forbids borrowing"):
        ipam.auto_assign("n4-0", "n4")
    assert Store(etcd).get(k.HandleKey("n4-0"), m.Handle) is None


def test_no_pool_and_disabled_pool(etcd: EtcdClient) -> None:
    ipam = Ipam(etcd)
    with pytest.raises(NoPool):
        ipam.auto_assign("h", "n1")
    Store(etcd).put(m.IPPool("10.244.0.0/16", disabled=True))
    with pytest.raises(NoPool):
        ipam.auto_assign("h", "n1")
    Store(etcd).put(m.IPPool("10.244.0.0/16", node_selector={"zone": "a"}))
    with pytest.raises(NoPool):
        ipam.auto_assign("h", "n1", node_labels={"zone": "b"})
    assert ipam.auto_assign("h", "n1", node_labels={"zone": "a"}) == "10.244.0.0"


def test_released_affinity_deletes_empty_blocks_and_keeps_used_ones(etcd: EtcdClient) -> None:
    add_pool(Store(etcd), m.IPPool("10.250.0.0/28", block_size=30))
    ipam = Ipam(etcd)
    for i in range(5):
        ipam.auto_assign(f"h{i}", "n1")  # blocks .0/30 (full) and .4/30 (one used)
    ipam.release_handle("h4")
    assert set(blocks(etcd)) == {"10.250.0.0/30", "10.250.0.4/30"}
    deleted, kept = ipam.release_affinities("n1")
    assert (deleted, kept) == (["10.250.0.4/30"], ["10.250.0.0/30"])
    assert affinities(etcd) == set()
    assert blocks(etcd)["10.250.0.0/30"].affinity is None
    # Releasing the last address of an unaffine block deletes the block.
    for i in range(4):
        ipam.release_handle(f"h{i}")
    assert blocks(etcd) == {}


def test_tunnel_address_has_its_own_handle_and_lands_on_the_node(etcd: EtcdClient) -> None:
    store = Store(etcd)
    add_pool(store, m.IPPool("10.244.0.0/16"))
    store.put(m.Node("n1", "192.168.77.11/24"))
    ipam = Ipam(etcd)
    ip = ipam.ensure_tunnel_address("n1", "vxlan")
    assert ipam.ensure_tunnel_address("n1", "vxlan") == ip
    node = store.get(k.NodeKey("n1"), m.Node)
    assert node is not None and node.value.vxlan_address == ip
    alloc = blocks(etcd)["10.244.0.0/26"].allocations[0]
    assert alloc == m.Allocation("vxlan-tunnel-addr.n1", None, "tunnel")
    assert check(etcd).ok
    etcd.delete(k.NodeKey("n1").path)
    assert check(etcd).leaked_handles == {"vxlan-tunnel-addr.n1"}


def test_pool_delete_refused_while_used(etcd: EtcdClient) -> None:
    store = Store(etcd)
    add_pool(store, m.IPPool("10.244.0.0/16"))
    ipam = Ipam(etcd)
    ipam.auto_assign("h", "n1")
    with pytest.raises(PoolInUse, match="1 allocated address"):
        delete_pool(etcd, "10.244.0.0/16")
    ipam.release_handle("h")
    delete_pool(etcd, "10.244.0.0/16")
    assert list_pools(store) == [] and blocks(etcd) == {} and affinities(etcd) == set()
