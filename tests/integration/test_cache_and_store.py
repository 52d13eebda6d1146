"""The agent cache (watchers → snapshot) and the typed store, against a real etcd."""

from __future__ import annotations

import threading

from agent.cache import Cache
from datastore import keys
from datastore import model as m
from datastore.errors import AlreadyExists, CasConflict
from datastore.etcd import EtcdClient
from datastore.store import Store
from testbed.wait import eventually


def test_store_round_trip_and_cas(etcd: EtcdClient) -> None:
    store = Store(etcd)
    node = m.Node("n1", "192.168.77.11/24")
    store.create(node)
    try:
        store.create(node)
        raise AssertionError("create-only write succeeded twice")
    except AlreadyExists:
        pass
    got = store.get(keys.NodeKey("n1"), m.Node)
    assert got is not None and got.value == node
    store.cas(m.Node("n1", "192.168.77.11/24", as_number=65001), got.mod_revision)
    try:
        store.cas(node, got.mod_revision)
        raise AssertionError("stale CAS succeeded")
    except CasConflict:
        pass
    etcd.put(keys.NodeKey("bad").path, b"{")
    assert store.get(keys.NodeKey("bad"), m.Node) is None
    assert [v.value.name for v in store.list(keys.NODES_PREFIX, m.Node)] == ["n1"]


def test_cache_snapshot_follows_etcd(etcd: EtcdClient) -> None:
    store = Store(etcd)
    store.put(m.ClusterConfig(as_number=64600))
    store.put(m.Node("n1", "192.168.77.11/24"))
    store.put(m.Pod("nsa", "a", {"app": "web"}, ("10.244.1.2",), "n1"))
    etcd.put(keys.PodKey("nsa", "broken").path, b"not json")
    changed = threading.Event()
    cache = Cache(etcd, on_change=changed.set).start()
    try:
        assert cache.in_sync.wait(10)
        snap = cache.snapshot()
        assert snap.in_sync
        assert snap.config.as_number == 64600
        assert set(snap.nodes) == {"n1"}
        assert set(snap.pods) == {("nsa", "a")}
        changed.clear()
        store.put(m.Namespace("nsa", {"team": "a"}))
        etcd.delete(keys.PodKey("nsa", "a").path)
        assert changed.wait(5)
        assert eventually(lambda: "nsa" in cache.snapshot().namespaces and not cache.snapshot().pods)
        snap = cache.snapshot()
        assert snap.namespaces["nsa"].labels == {"team": "a"}
        assert dict(snap.pods) == {}
        # Endpoints are indexed by node, and the journal says what changed between two snapshots.
        before = cache.snapshot()
        store.put(m.Endpoint("n1", "nsa", "b", "eth0", "cali0123456789a", ("10.244.1.3/32",)))
        store.put(m.Endpoint("n2", "nsa", "c", "eth0", "cali0123456789b", ("10.244.2.3/32",)))
        assert eventually(lambda: len(cache.snapshot().endpoints) == 2)
        after = cache.snapshot()
        assert [ep.pod for ep in after.local_endpoints("n1")] == ["b"]
        assert after.changes_since(before) == {
            "endpoints": frozenset({("n1", "nsa", "b", "eth0"), ("n2", "nsa", "c", "eth0")})
        }
        etcd.delete(keys.ClusterConfigKey().path)
        assert eventually(lambda: cache.snapshot().config == m.ClusterConfig())
        assert cache.problems() == []
    finally:
        cache.stop()
    # A stopped (or dead) watch is reported, naming its prefix.
    assert any(p.startswith(f"watch {keys.PODS_PREFIX}") and "ended" in p for p in cache.problems())
