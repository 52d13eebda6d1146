"""Snapshot-then-watch against a real etcd that is restarted and compacted underneath it."""

from __future__ import annotations

import base64
import json
import logging
import random
import threading
import time
from collections.abc import Callable

import pytest

from datastore import codec, keys
from datastore import model as m
from datastore.errors import Unavailable
from datastore.etcd import EtcdClient
from datastore.watcher import Deleted, InSync, Malformed, Update, Updated, Watcher
from testbed.etcd_server import EtcdServer

PREFIX = keys.NAMESPACES_PREFIX


class Consumer:
    """Applies the watcher's stream to a view and checks its consistency on every event."""

    def __init__(self) -> None:
        self.view: dict[str, codec.Model] = {}
        self.revs: dict[str, int] = {}
        self.in_syncs: list[int] = []
        self.bad: dict[str, str] = {}  # path -> reason, as Malformed reported it
        self.problems: list[str] = []
        self.gate: threading.Event | None = None
        self.at_gate = threading.Event()
        self.changed = threading.Condition()

    def __call__(self, update: Update) -> None:
        if self.gate is not None:  # a consumer that is slow right now
            gate, self.gate = self.gate, None
            self.at_gate.set()
            gate.wait(30)
        if isinstance(update, InSync):
            self.in_syncs.append(update.revision)
        elif isinstance(update, Updated):
            if update.mod_revision <= self.revs.get(update.path, 0):
                self.problems.append(f"stale update of {update.path} at {update.mod_revision}")
            self.view[update.path] = update.value
            self.revs[update.path] = update.mod_revision
            self.bad.pop(update.path, None)
        elif isinstance(update, Malformed):
            self.view.pop(update.path, None)
            self.bad[update.path] = update.reason
        elif isinstance(update, Deleted):
            if update.path not in self.view and update.path not in self.bad:
                self.problems.append(f"phantom delete of {update.path}")
            self.view.pop(update.path, None)
            self.revs.pop(update.path, None)
            self.bad.pop(update.path, None)
        with self.changed:
            self.changed.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(min(left, 0.2))
        return True


def etcdctl_view(server: EtcdServer, prefix: str) -> dict[str, codec.Model]:
    """What an operator sees with `etcdctl get --prefix`, decoded the same way."""
    out = json.loads(server.etcdctl("get", "--prefix", prefix, "-w", "json"))
    view: dict[str, codec.Model] = {}
    for kv in out.get("kvs", []):
        path = base64.b64decode(kv["key"]).decode()
        view[path] = codec.decode(path, base64.b64decode(kv["value"]))[1]
    return view


def retrying(fn: Callable[[], object]) -> None:
    for _ in range(200):
        try:
            fn()
            return
        except Unavailable:
            time.sleep(0.05)
    raise AssertionError("etcd stayed unavailable")


def test_1000_updates_through_two_restarts_and_a_compaction(etcd_server: EtcdServer, etcd: EtcdClient) -> None:
    consumer = Consumer()
    watcher = Watcher(etcd, PREFIX, consumer, retry_delay=0.05, max_retry_delay=0.5).start()
    rng = random.Random(7)
    try:
        assert consumer.wait_for(lambda: len(consumer.in_syncs) == 1)
        for i in range(1000):
            name = f"ns-{rng.randrange(60)}"
            path = keys.NamespaceKey(name).path
            if rng.random() < 0.15:
                retrying(lambda p=path: etcd.delete(p))
            else:
                value = codec.encode(m.Namespace(name, {"round": str(i)}))
                retrying(lambda p=path, v=value: etcd.put(p, v))
            if i == 250:
                resumed = watcher.reconnects
                etcd_server.restart(down_for=0.3)
                # Let the watcher see this restart on its own before the next one (it may be in its retry backoff):
                # it resumes the watch where it was, without a new snapshot.
                assert consumer.wait_for(lambda n=resumed: watcher.reconnects > n), "watch not resumed after restart"
            if i == 500:
                # The consumer is stuck on an update while etcd restarts and we write on and compact history: the
                # watcher's resume revision is then gone, and it must take a new snapshot and send differences.
                gate = threading.Event()
                consumer.gate = gate
                retrying(lambda: etcd.put(keys.NamespaceKey("gate").path, codec.encode(m.Namespace("gate"))))
                assert consumer.at_gate.wait(20), "no update reached the consumer"
                etcd_server.restart(down_for=0.3)
            if i == 600:
                etcd_server.compact()
                gate.set()
        expected = etcdctl_view(etcd_server, PREFIX)
        assert consumer.wait_for(lambda: consumer.view == expected), "consumer view differs from etcdctl"
        assert consumer.problems == []
        # The initial snapshot and one after the compaction: a restart alone costs no re-list.
        assert watcher.compactions == 1
        assert watcher.snapshots == 2
        assert watcher.reconnects >= 2
        assert len(consumer.in_syncs) == watcher.snapshots
        assert consumer.in_syncs == sorted(consumer.in_syncs)
        assert watcher.alive()
    finally:
        watcher.stop()


def test_malformed_value_is_logged_and_skipped(etcd: EtcdClient, caplog: pytest.LogCaptureFixture) -> None:
    good = {n: codec.encode(m.Namespace(n)) for n in ("a", "b", "d")}
    for n, v in good.items():
        etcd.put(keys.NamespaceKey(n).path, v)
    bad_path = keys.NamespaceKey("c").path
    etcd.put(bad_path, b'{"name": "c", "labels": "not-a-map"}')
    consumer = Consumer()
    caplog.set_level(logging.WARNING, logger="datastore.watcher")
    watcher = Watcher(etcd, PREFIX, consumer).start()
    try:
        assert consumer.wait_for(lambda: len(consumer.in_syncs) == 1)
        assert set(consumer.view) == {keys.NamespaceKey(n).path for n in good}
        assert bad_path in watcher.malformed
        assert "labels" in consumer.bad[bad_path]
        assert any(bad_path in r.getMessage() and "labels" in r.getMessage() for r in caplog.records)
        # A valid key turning malformed disappears for the consumer; later keys still arrive.
        a_path = keys.NamespaceKey("a").path
        etcd.put(a_path, b"garbage")
        etcd.put(keys.NamespaceKey("e").path, codec.encode(m.Namespace("e")))
        assert consumer.wait_for(lambda: keys.NamespaceKey("e").path in consumer.view)
        assert a_path not in consumer.view
        assert "JSON" in consumer.bad[a_path]
        # Mended values come back.
        etcd.put(bad_path, codec.encode(m.Namespace("c")))
        assert consumer.wait_for(lambda: bad_path in consumer.view)
        assert bad_path not in watcher.malformed and bad_path not in consumer.bad
        # Deleting a malformed key is reported, so a consumer can forget it.
        etcd.delete(a_path)
        assert consumer.wait_for(lambda: a_path not in consumer.bad)
        assert consumer.problems == []
    finally:
        watcher.stop()


def test_a_slow_consumer_is_not_a_stalled_stream(etcd_server: EtcdServer, etcd: EtcdClient) -> None:
    """The progress deadline counts only while the watcher waits on etcd: a consumer that takes longer than the
    deadline over one update must not make the watch give up on a healthy member (and re-list)."""
    client = EtcdClient([etcd_server.endpoint], watch_progress_after=0.3, watch_stall_after=1.0)
    consumer = Consumer()
    watcher = Watcher(client, PREFIX, consumer).start()
    try:
        assert consumer.wait_for(lambda: len(consumer.in_syncs) == 1)
        gate = threading.Event()
        consumer.gate = gate
        etcd.put(keys.NamespaceKey("slow").path, codec.encode(m.Namespace("slow")))
        assert consumer.at_gate.wait(10)
        time.sleep(2.5)  # the consumer is busy for 2.5 deadlines
        etcd.put(keys.NamespaceKey("after").path, codec.encode(m.Namespace("after")))
        gate.set()
        assert consumer.wait_for(lambda: keys.NamespaceKey("after").path in consumer.view)
        assert (watcher.stalls, watcher.reconnects, watcher.snapshots) == (0, 0, 1)
        assert consumer.problems == []
    finally:
        watcher.stop()
        client.close()
