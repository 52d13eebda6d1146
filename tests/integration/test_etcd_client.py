"""The etcd client wrapper against a real etcd server."""

from __future__ import annotations

import threading
import time

import pytest

from datastore.errors import AlreadyExists, CasConflict, Unavailable
from datastore.etcd import Delete, EtcdClient, ModRevisionIs, Put, ValueIs
from datastore.watcher import Watcher
from testbed.etcd_server import EtcdServer, free_port

COUNTER = "/podnet/v1/test/counter"


def test_cas_counter_8_threads_x_500(etcd: EtcdClient) -> None:
    etcd.put(COUNTER, b"0")
    conflicts = [0] * 8

    def worker(i: int) -> None:
        for _ in range(500):
            while True:
                kv = etcd.get(COUNTER)
                assert kv is not None
                try:
                    etcd.cas(COUNTER, str(int(kv.value) + 1).encode(), kv.mod_revision)
                    break
                except CasConflict:
                    conflicts[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = etcd.get(COUNTER)
    assert final is not None and final.value == b"4000"
    assert sum(conflicts) > 0, "8 threads on one key should have collided at least once"


def test_create_only_and_cas_on_absent(etcd: EtcdClient) -> None:
    etcd.create("/podnet/v1/test/a", b"1")
    with pytest.raises(AlreadyExists):
        etcd.create("/podnet/v1/test/a", b"2")
    with pytest.raises(CasConflict):
        etcd.cas("/podnet/v1/test/b", b"x", 12345)
    etcd.cas("/podnet/v1/test/b", b"x", 0)  # 0 = must be absent
    kv = etcd.get("/podnet/v1/test/b")
    assert kv is not None and kv.value == b"x"


def test_get_prefix_at_revision_and_delete(etcd: EtcdClient) -> None:
    r1 = etcd.put("/podnet/v1/test/p/1", b"a")
    etcd.put("/podnet/v1/test/p/2", b"b")
    etcd.put("/podnet/v1/test/q", b"not under p/")
    now, rev = etcd.get_prefix("/podnet/v1/test/p/")
    assert [kv.key for kv in now] == ["/podnet/v1/test/p/1", "/podnet/v1/test/p/2"]
    then, _ = etcd.get_prefix("/podnet/v1/test/p/", revision=r1)
    assert [kv.value for kv in then] == [b"a"]
    kv1 = now[0]
    with pytest.raises(CasConflict):
        etcd.delete(kv1.key, mod_revision=kv1.mod_revision + 1000)
    assert etcd.delete(kv1.key, mod_revision=kv1.mod_revision)
    assert not etcd.delete(kv1.key)
    assert etcd.get(kv1.key) is None
    assert rev >= r1


def test_txn_is_atomic_across_keys(etcd: EtcdClient) -> None:
    etcd.put("/podnet/v1/test/x", b"1")
    kv = etcd.get("/podnet/v1/test/x")
    assert kv is not None
    ok = etcd.txn(
        [ModRevisionIs("/podnet/v1/test/x", kv.mod_revision), ValueIs("/podnet/v1/test/x", b"1")],
        [Put("/podnet/v1/test/x", b"2"), Put("/podnet/v1/test/y", b"2")],
    )
    assert ok.succeeded
    failed = etcd.txn(
        [ModRevisionIs("/podnet/v1/test/x", kv.mod_revision)],
        [Delete("/podnet/v1/test/", prefix=True)],
        [Put("/podnet/v1/test/z", b"failure-branch")],
    )
    assert not failed.succeeded
    keys, _ = etcd.get_prefix("/podnet/v1/test/")
    assert {k.key: k.value for k in keys} == {
        "/podnet/v1/test/x": b"2",
        "/podnet/v1/test/y": b"2",
        "/podnet/v1/test/z": b"failure-branch",
    }


def test_lease_keeps_keys_alive_and_revoke_removes_them(etcd: EtcdClient) -> None:
    keeper = etcd.lease(ttl=2)
    etcd.put("/podnet/v1/test/leased", b"x", lease=keeper.id)
    time.sleep(3.5)  # longer than the TTL: only the keep-alive keeps the key
    assert etcd.get("/podnet/v1/test/leased") is not None
    keeper.close(revoke=True)
    assert etcd.get("/podnet/v1/test/leased") is None


def test_lease_expires_without_keepalive(etcd: EtcdClient) -> None:
    lease = etcd.grant(1)
    etcd.put("/podnet/v1/test/leased2", b"x", lease=lease)
    deadline = time.monotonic() + 10
    while etcd.get("/podnet/v1/test/leased2") is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert etcd.get("/podnet/v1/test/leased2") is None


def test_unreachable_etcd_is_unavailable() -> None:
    client = EtcdClient([f"127.0.0.1:{free_port()}"], timeout=0.5)
    try:
        with pytest.raises(Unavailable):
            client.get("/podnet/v1/x")
    finally:
        client.close()


def test_client_recovers_after_etcd_restart(etcd_server: EtcdServer, etcd: EtcdClient) -> None:
    etcd.put("/podnet/v1/test/survives", b"1")
    etcd_server.kill()
    with pytest.raises(Unavailable):
        etcd.get("/podnet/v1/test/survives")
    etcd_server.start()
    kv = etcd.get("/podnet/v1/test/survives")  # same client object, no 5-minute penalty
    assert kv is not None and kv.value == b"1"


def test_quiet_watch_is_kept_alive_by_progress_requests(etcd_server: EtcdServer) -> None:
    """A watch on which nothing changes is not mistaken for a stalled one: etcd answers its progress requests (the
    server's own notifications come only every 5 s here, longer than this test's stall deadline)."""
    client = EtcdClient([etcd_server.endpoint], watch_progress_after=0.5, watch_stall_after=2.0)
    seen: list[object] = []
    watcher = Watcher(client, "/podnet/v1/test/quiet/", seen.append).start()
    try:
        time.sleep(4.5)
        assert watcher.alive()
        assert (watcher.stalls, watcher.reconnects, client.stalls) == (0, 0, 0)
        assert time.monotonic() - watcher.last_progress < 1.5
        stream = watcher._stream
        assert stream is not None and stream.progress_requests >= 2
    finally:
        watcher.stop()
        client.close()


def test_large_prefix_is_read_in_pages_of_one_snapshot(etcd: EtcdClient) -> None:
    """6 MB under one prefix (over gRPC's 4 MiB default for one response: 50 000 endpoints are ~19 MB) is read
    whole, in pages that all see the revision of the first."""
    value = b"x" * 2048
    for start in range(0, 3000, 100):
        etcd.txn([], [Put(f"/big/{i:05d}", value) for i in range(start, start + 100)])
    kvs, rev = etcd.get_prefix("/big/")
    assert [kv.key for kv in kvs] == [f"/big/{i:05d}" for i in range(3000)]
    etcd.put("/big/00000", b"changed")
    etcd.put("/big/99999", b"new")
    # Pinned to the first read's revision, small pages see neither write.
    again, pinned = etcd.get_prefix("/big/", revision=rev, page=7)
    assert pinned == rev
    assert [(kv.key, kv.value) for kv in again] == [(kv.key, kv.value) for kv in kvs]
    latest, _ = etcd.get_prefix("/big/", page=1000)
    assert len(latest) == 3001 and latest[0].value == b"changed"
