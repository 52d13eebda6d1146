"""The agent's cache against a real 3-member etcd cluster whose members hang, die, or hold keys it cannot read.

A member that hangs (SIGSTOP) keeps its sockets open, so only keepalive and the watch progress deadline notice it;
the cache must then follow writes made through another member within 15 s, and a failover must not re-list
anything (each watch resumes from the revision it had delivered).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from agent.cache import Cache
from datastore import codec, keys
from datastore import model as m
from datastore.errors import TimedOut, Unavailable
from datastore.etcd import EtcdClient
from datastore.watcher import Deleted, InSync, Malformed, Update, Updated, Watcher
from testbed.etcd_cluster import EtcdCluster

DETECT_WITHIN = 15.0


@pytest.fixture
def cluster() -> Iterator[EtcdCluster]:
    c = EtcdCluster(3).start()
    try:
        yield c
    finally:
        c.stop()


def put_retrying(client: EtcdClient, model: codec.Model, deadline: float = 20.0) -> None:
    """Write through whichever member answers (a write fails while the cluster elects a new leader)."""
    end = time.monotonic() + deadline
    while True:
        try:
            client.put(codec.key_of(model).path, codec.encode(model))
            return
        except Unavailable:
            if time.monotonic() > end:
                raise
            time.sleep(0.1)


def wait_until(predicate: Callable[[], bool], timeout: float) -> float | None:
    """Seconds until ``predicate`` held, or None if it did not within ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def seed(client: EtcdClient) -> None:
    for i in range(3):
        put_retrying(client, m.Namespace(f"ns{i}", {"i": str(i)}))
        put_retrying(client, m.Pod(f"ns{i}", "web", {"app": "web"}))


def writes_through(client: EtcdClient, tag: str) -> None:
    """Write to two watched prefixes (``sees`` checks that the cache has both)."""
    put_retrying(client, m.Namespace(f"after-{tag}"))
    put_retrying(client, m.Pod("ns0", f"after-{tag}", {"tag": tag}))


def sees(cache: Cache, tag: str) -> Callable[[], bool]:
    def check() -> bool:
        snap = cache.snapshot()
        return f"after-{tag}" in snap.namespaces and ("ns0", f"after-{tag}") in snap.pods

    return check


def snapshots(cache: Cache) -> list[int]:
    return [w.snapshots for w in cache.watchers]


def counters(cache: Cache) -> str:
    return "; ".join(
        f"{w.prefix}: snapshots {w.snapshots} reconnects {w.reconnects} stalls {w.stalls} "
        f"compactions {w.compactions} errors {w.errors}"
        for w in cache.watchers
    )


def test_hung_member_is_left_and_the_cache_follows_writes_through_another(cluster: EtcdCluster) -> None:
    leader = cluster.leader()
    used, other = cluster.followers()
    client = EtcdClient([used.endpoint, other.endpoint, leader.endpoint])
    writer = EtcdClient([leader.endpoint])
    cache = Cache(client)
    try:
        seed(writer)
        cache.start()
        assert cache.in_sync.wait(10)
        assert client.endpoint == used.endpoint
        before = snapshots(cache)
        time.sleep(1)  # let the streams settle into their quiet state: the hang must be found by silence alone

        cluster.pause(used)
        paused = time.monotonic()
        writes_through(writer, "hang")
        took = wait_until(sees(cache, "hang"), DETECT_WITHIN + 5)
        print(f"\nSIGSTOP of the member in use -> write through another seen after {took}s")
        assert took is not None and took < DETECT_WITHIN, f"the cache did not follow within {DETECT_WITHIN}s"
        assert client.endpoint != used.endpoint
        assert client.failovers >= 1 and client.stalls >= 1
        # Every watch, not only the two written to, left the hung member in time (each notices on its own).
        left = DETECT_WITHIN - (time.monotonic() - paused)
        assert wait_until(lambda: all(w.reconnects >= 1 for w in cache.watchers), left) is not None, counters(cache)
        # No storm: every watch resumed where it was; none re-listed more than once.
        after = snapshots(cache)
        assert all(a - b <= 1 for a, b in zip(after, before, strict=True)), (before, counters(cache))
        assert all(w.alive() for w in cache.watchers)
        assert time.monotonic() - max(w.last_progress for w in cache.watchers) < 5
        # Later writes arrive promptly: nothing is left on the hung member.
        writes_through(writer, "later")
        assert (wait_until(sees(cache, "later"), 3.0)) is not None
    finally:
        cluster.resume(used)
        cache.stop()
        client.close()
        writer.close()


def test_leader_killed_and_the_cache_follows(cluster: EtcdCluster) -> None:
    leader = cluster.leader()
    f0, f1 = cluster.followers()
    client = EtcdClient([leader.endpoint, f0.endpoint, f1.endpoint])
    # A write sent during the election waits for a leader; a short deadline lets the writer try the other member.
    writer = EtcdClient([f0.endpoint, f1.endpoint], timeout=1.0)
    cache = Cache(client)
    try:
        seed(writer)
        cache.start()
        assert cache.in_sync.wait(10)
        assert client.endpoint == leader.endpoint
        before = snapshots(cache)

        start = time.monotonic()
        cluster.kill(leader)
        writes_through(writer, "nolead")
        written = time.monotonic() - start
        seen = wait_until(sees(cache, "nolead"), DETECT_WITHIN + 5)
        took = None if seen is None else time.monotonic() - start
        print(f"\nleader killed -> write through a follower done after {written:.2f}s, seen after {took}s")
        assert took is not None and took < DETECT_WITHIN
        assert client.endpoint != leader.endpoint
        after = snapshots(cache)
        assert all(a - b <= 1 for a, b in zip(after, before, strict=True)), (before, counters(cache))
        assert all(w.alive() for w in cache.watchers)
        assert cluster.leader() in (f0, f1)
    finally:
        cache.stop()
        client.close()
        writer.close()


def test_a_timed_out_call_does_not_break_the_watches(cluster: EtcdCluster) -> None:
    """One call that gets no answer in time moves later calls elsewhere, but leaves every watch where it is."""
    leader = cluster.leader()
    f0, f1 = cluster.followers()
    client = EtcdClient([f0.endpoint, f1.endpoint, leader.endpoint])
    writer = EtcdClient([leader.endpoint])
    cache = Cache(client)
    try:
        seed(writer)
        cache.start()
        assert cache.in_sync.wait(10)
        before = snapshots(cache)
        # A linearizable read on a follower waits for the leader: with the leader hung for a moment (shorter than
        # an election timeout, so nothing else changes) the read times out for real.
        normal, client.timeout = client.timeout, 0.3
        cluster.pause(leader)
        try:
            with pytest.raises(TimedOut):
                client.get(keys.NamespaceKey("ns0").path)
        finally:
            cluster.resume(leader)
            client.timeout = normal
        assert client.failovers >= 1  # the read was retried on the next member, which waits for the leader too
        assert client.get(keys.NamespaceKey("ns0").path) is not None
        writes_through(writer, "deadline")
        assert wait_until(sees(cache, "deadline"), 5.0) is not None
        assert snapshots(cache) == before
        assert [w.reconnects for w in cache.watchers] == [0] * len(cache.watchers)
    finally:
        cache.stop()
        client.close()
        writer.close()


class RaisingConsumer:
    """A consumer with a bug: it raises on one key. Records what it was told."""

    def __init__(self, poison: str) -> None:
        self.poison = poison
        self.updated: dict[str, codec.Model] = {}
        self.malformed: dict[str, str] = {}
        self.deleted: list[tuple[keys.Key | None, str]] = []
        self.in_syncs: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, update: Update) -> None:
        with self.lock:
            if isinstance(update, Updated):
                if update.path == self.poison:
                    raise RuntimeError("consumer bug")
                self.updated[update.path] = update.value
                self.malformed.pop(update.path, None)
            elif isinstance(update, Malformed):
                assert update.key is None or update.key.path == update.path
                self.malformed[update.path] = update.reason
                self.updated.pop(update.path, None)
            elif isinstance(update, Deleted):
                self.deleted.append((update.key, update.path))
                self.updated.pop(update.path, None)
                self.malformed.pop(update.path, None)
            elif isinstance(update, InSync):
                self.in_syncs.append(update.revision)


def test_non_utf8_key_and_a_raising_consumer_do_not_stop_the_watch(
    cluster: EtcdCluster, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = keys.NAMESPACES_PREFIX
    # As a user would write them: etcdctl with raw bytes in the key (argv is bytes; fsdecode keeps them).
    early = os.fsdecode(prefix.encode() + b"caf\xe9-early")
    late = os.fsdecode(prefix.encode() + b"caf\xe9-late")
    cluster.etcdctl("put", early, '{"name": "x"}')
    poison = keys.NamespaceKey("poison").path
    consumer = RaisingConsumer(poison)
    client = EtcdClient(cluster.endpoints)
    writer = EtcdClient(cluster.endpoints[::-1])
    watcher = Watcher(client, prefix, consumer)
    try:
        put_retrying(writer, m.Namespace("a"))
        watcher.start()
        assert wait_until(lambda: bool(consumer.in_syncs), 10) is not None
        assert early in consumer.malformed and "UTF-8" in consumer.malformed[early]

        cluster.etcdctl("put", late, '{"name": "y"}')
        put_retrying(writer, m.Namespace("poison"))
        put_retrying(writer, m.Namespace("b"))
        path_b = keys.NamespaceKey("b").path
        assert wait_until(lambda: path_b in consumer.updated, 10) is not None, "the watch stopped delivering"
        assert late in consumer.malformed and "UTF-8" in consumer.malformed[late]
        assert poison in consumer.malformed and "consumer" in consumer.malformed[poison]
        assert poison in watcher.malformed and late in watcher.malformed
        assert watcher.alive() and watcher.errors >= 1
        logged = " ".join(r.getMessage() for r in caplog.records)
        assert "caf\\xe9-late" in logged and poison in logged

        # Deleting an unreadable key is reported with key None; the watch goes on.
        cluster.etcdctl("del", late)
        put_retrying(writer, m.Namespace("c"))
        path_c = keys.NamespaceKey("c").path
        assert wait_until(lambda: path_c in consumer.updated, 10) is not None
        assert (None, late) in consumer.deleted
        assert watcher.alive() and watcher.snapshots == 1
    finally:
        watcher.stop()
        client.close()
        writer.close()
