"""Group commit of one node's allocations against a real etcd: one transaction for many handles, a lost compare
writes nothing, and concurrent callers never share an address."""

from __future__ import annotations

import threading

import pytest

from datastore import keys as k
from datastore import model as m
from datastore.etcd import EtcdClient
from datastore.store import Store
from ipam.allocator import Ipam
from ipam.batch import GroupAllocator
from ipam.check import check
from ipam.pools import add_pool

pytestmark = pytest.mark.integration


def handles(etcd: EtcdClient) -> dict[str, tuple[str, ...]]:
    return {v.value.handle: v.value.ips for v in Store(etcd).list(k.HANDLES_PREFIX, m.Handle)}


def test_a_batch_is_one_transaction(etcd: EtcdClient) -> None:
    add_pool(Store(etcd), m.IPPool("10.244.0.0/16"))
    ipam = Ipam(etcd)
    ipam.auto_assign("first", "n1")  # claims the node's block: the batch path only fills cached blocks
    before = etcd.revision()
    got = ipam.auto_assign_batch([("h1", "ns/a"), ("h2", "ns/b"), ("h1", "ns/a"), ("h3", None)], "n1")
    assert etcd.revision() == before + 1
    assert got == {"h1": "10.244.0.1", "h2": "10.244.0.2", "h3": "10.244.0.3"}
    assert handles(etcd) == {"first": ("10.244.0.0",), "h1": ("10.244.0.1",), "h2": ("10.244.0.2",),
                             "h3": ("10.244.0.3",)}  # fmt: skip
    block = Store(etcd).get(k.BlockKey("10.244.0.0/26"), m.Block)
    assert block is not None and block.value.allocations[2] == m.Allocation("h2", "ns/b", "pod")
    assert check(etcd).problems == ()  # no address twice, every allocation has its handle and vice versa


def test_a_lost_compare_writes_nothing(etcd: EtcdClient) -> None:
    add_pool(Store(etcd), m.IPPool("10.244.0.0/16"))
    ipam = Ipam(etcd)
    ipam.auto_assign("taken", "n1")
    # A handle that exists already (a retried ADD): its absence compare fails, so nothing is written.
    before = etcd.revision()
    assert ipam.auto_assign_batch([("new", None), ("taken", None)], "n1") == {}
    assert etcd.revision() == before and "new" not in handles(etcd)
    # A stale block (another writer allocated since this cache was filled) fails the same way.
    Ipam(etcd).auto_assign("meanwhile", "n1")
    before = etcd.revision()
    assert ipam.auto_assign_batch([("new", None)], "n1") == {}
    assert etcd.revision() == before and "new" not in handles(etcd)
    # Re-read, it goes through, next to the other writer's address.
    assert ipam.auto_assign_batch([("new", None)], "n1", refresh=True) == {"new": "10.244.0.2"}
    assert check(etcd).problems == ()  # no address twice, every allocation has its handle and vice versa


def test_only_what_fits_in_cached_blocks(etcd: EtcdClient) -> None:
    add_pool(Store(etcd), m.IPPool("10.250.0.0/28", block_size=30))
    ipam = Ipam(etcd)
    assert ipam.auto_assign_batch([("a", None)], "n1") == {}  # no block yet: left to auto_assign
    ipam.auto_assign("a", "n1")
    got = ipam.auto_assign_batch([(f"h{i}", None) for i in range(5)], "n1")
    assert got == {"h0": "10.250.0.1", "h1": "10.250.0.2", "h2": "10.250.0.3"}


def test_concurrent_callers_get_distinct_addresses(etcd: EtcdClient) -> None:
    """40 threads on one node through the group allocator (across a block boundary), while an independent writer
    allocates on the same node's blocks: every handle gets one address, no address twice, books balanced."""
    add_pool(Store(etcd), m.IPPool("10.244.0.0/16", block_size=28))
    group = GroupAllocator(Ipam(etcd))
    start = threading.Barrier(41)
    results: dict[str, str] = {}
    errors: list[Exception] = []

    def pod(i: int) -> None:
        start.wait()
        try:
            results[f"h{i}"] = group.auto_assign(f"h{i}", "n1", pod=f"ns/p{i}")
        except Exception as exc:  # reported below
            errors.append(exc)

    def rival() -> None:
        other = Ipam(etcd)
        start.wait()
        for i in range(10):
            results[f"r{i}"] = other.auto_assign(f"r{i}", "n1")

    threads = [threading.Thread(target=pod, args=(i,)) for i in range(40)] + [threading.Thread(target=rival)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert len(results) == 50 and len(set(results.values())) == 50
    assert handles(etcd) == {h: (ip,) for h, ip in results.items()}
    assert group.auto_assign("h7", "n1", pod="ns/p7") == results["h7"]  # idempotent
    assert check(etcd).problems == ()  # no address twice, every allocation has its handle and vice versa


def test_releases_are_one_transaction(etcd: EtcdClient) -> None:
    add_pool(Store(etcd), m.IPPool("10.244.0.0/16"))
    ipam = Ipam(etcd)
    ips = {h: ipam.auto_assign(h, "n1", pod=f"ns/{h}") for h in ("a", "b", "c", "d")}
    before = etcd.revision()
    got = ipam.release_handles(["a", "c", "a", "unknown"])
    assert etcd.revision() == before + 1
    assert got == {"a": [ips["a"]], "c": [ips["c"]], "unknown": []}
    assert handles(etcd) == {"b": (ips["b"],), "d": (ips["d"],)}
    block = Store(etcd).get(k.BlockKey("10.244.0.0/26"), m.Block)
    assert block is not None and sorted(a.handle for a in block.value.allocations.values()) == ["b", "d"]
    # The node's cache follows: the next allocation needs no re-read and takes a freed address.
    assert ipam.auto_assign_batch([("e", None)], "n1") == {"e": ips["a"]}
    assert check(etcd).problems == ()


def test_a_release_that_lost_a_compare_writes_nothing(etcd: EtcdClient) -> None:
    add_pool(Store(etcd), m.IPPool("10.244.0.0/16"))
    ipam = Ipam(etcd)
    ipam.auto_assign("a", "n1")
    ipam.auto_assign("b", "n1")
    real_txn = etcd.txn

    def rival_writes_first(*args: object, **kwargs: object) -> object:
        etcd.txn = real_txn  # type: ignore[method-assign]
        Ipam(etcd).auto_assign("rival", "n1")  # the block changes between the reads and the transaction
        return real_txn(*args, **kwargs)  # type: ignore[arg-type]

    etcd.txn = rival_writes_first  # type: ignore[method-assign]
    before_handles = handles(etcd)
    assert ipam.release_handles(["a", "b"]) is None
    assert {h: v for h, v in handles(etcd).items() if h != "rival"} == before_handles
    assert check(etcd).problems == ()


def test_concurrent_releases_and_allocations(etcd: EtcdClient) -> None:
    """DELs and ADDs of one node at once through the group allocator: every release takes exactly its handle's
    address, every allocation gets a free one, nothing is left half-done."""
    add_pool(Store(etcd), m.IPPool("10.244.0.0/16", block_size=28))
    group = GroupAllocator(Ipam(etcd))
    old = {f"old{i}": group.auto_assign(f"old{i}", "n1") for i in range(30)}
    start = threading.Barrier(60)
    released: dict[str, list[str]] = {}
    new: dict[str, str] = {}
    errors: list[Exception] = []

    def delete(h: str) -> None:
        start.wait()
        try:
            released[h] = group.release(h, "n1")
        except Exception as exc:  # reported below
            errors.append(exc)

    def add(h: str) -> None:
        start.wait()
        try:
            new[h] = group.auto_assign(h, "n1")
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=delete, args=(h,)) for h in old]
    threads += [threading.Thread(target=add, args=(f"new{i}",)) for i in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert released == {h: [ip] for h, ip in old.items()}
    assert len(set(new.values())) == 30
    assert handles(etcd) == {h: (ip,) for h, ip in new.items()}
    assert group.release("old3", "n1") == []  # idempotent
    assert check(etcd).problems == ()
