"""Status written from its own thread, against a real etcd that hangs (SIGSTOP) or goes away: handing status over
never waits, only the newest value is written once etcd answers, what etcd still holds is not rewritten, a lost
lease is re-granted and everything republished without being asked, and an outage is logged once."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Iterator

import pytest

from agent.status import Backoff, StatusPublisher, StatusReporter
from datastore import keys as k
from datastore import model as m
from datastore.errors import DatastoreError
from datastore.etcd import EtcdClient
from testbed.etcd_server import EtcdServer
from testbed.wait import eventually

pytestmark = pytest.mark.integration

FAST = Backoff(first=0.1, cap=0.5)


def route(cidr: str, via: str = "192.168.77.12") -> m.RouteStatus:
    return m.RouteStatus("n1", cidr, "remote-block", via=via, dev="eth0", learned_from=via)


def routes(*items: m.RouteStatus) -> dict[str, m.RouteStatus]:
    return {r.cidr: r for r in items}


def stored(etcd: EtcdClient) -> dict[str, str | None]:
    kvs, _ = etcd.get_prefix(k.routes_prefix("n1"))
    return {kv.key.rsplit("/", 1)[1]: m.RouteStatus.from_json(json.loads(kv.value)).via for kv in kvs}


@pytest.fixture
def hung(etcd_server: EtcdServer) -> Iterator[int]:
    """The etcd process, to stop and continue; always continued at the end."""
    assert etcd_server.proc is not None
    pid = etcd_server.proc.pid
    try:
        yield pid
    finally:
        os.kill(pid, signal.SIGCONT)


def test_offers_never_wait_for_a_hung_etcd_and_only_the_newest_status_is_written(
    etcd: EtcdClient, etcd_server: EtcdServer, hung: int, caplog: pytest.LogCaptureFixture
) -> None:
    pub = StatusPublisher(EtcdClient([etcd_server.endpoint], timeout=1.0), "n1", ttl=30)
    reporter = StatusReporter(pub, FAST).start()
    try:
        reporter.offer_routes(routes(route("10.244.2.0/26")))
        assert reporter.wait_idle(5)
        assert stored(etcd) == {"10.244.2.0-26": "192.168.77.12"}
        rev = etcd.revision()

        caplog.set_level(logging.DEBUG, logger="agent.status")
        os.kill(hung, signal.SIGSTOP)
        worst = 0.0
        for i in range(200):  # a busy runner: one pass after another, each with a new status
            t0 = time.monotonic()
            reporter.offer_routes(routes(route("10.244.2.0/26", f"192.168.77.{i % 50 + 100}")))
            reporter.offer_agent(m.AgentStatus("n1", True, i))
            worst = max(worst, time.monotonic() - t0)
            time.sleep(0.01)
        assert worst < 0.05, f"an offer waited {worst:.3f}s for etcd"
        time.sleep(2.5)  # several attempts fail meanwhile
        final = routes(route("10.244.2.0/26", "192.168.77.7"), route("10.244.3.0/26"))
        reporter.offer_routes(final)
        reporter.offer_agent(m.AgentStatus("n1", True, 999))
        assert not reporter.wait_idle(0.5)  # still failing
        os.kill(hung, signal.SIGCONT)

        assert reporter.wait_idle(10)
        assert stored(etcd) == {"10.244.2.0-26": "192.168.77.7", "10.244.3.0-26": "192.168.77.12"}
        agent = etcd.get(k.AgentStatusKey("n1").path)
        assert agent is not None and b'"revision":999' in agent.value
        # 200 superseded statuses were never written: at most the writes in flight when etcd stopped, then these.
        assert etcd.revision() - rev <= 5, etcd.revision() - rev
        warnings = [r for r in caplog.records if r.name == "agent.status" and r.levelno >= logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]  # the outage, once
        assert [r for r in caplog.records if r.name == "agent.status" and "again" in r.getMessage()]
    finally:
        os.kill(hung, signal.SIGCONT)
        reporter.stop()
        pub.close()
        pub.client.close()


def test_after_a_failure_only_what_changed_is_rewritten(etcd: EtcdClient, etcd_server: EtcdServer) -> None:
    """A failed write makes the publisher re-list; what etcd still holds under our lease is not written again (a
    node with thousands of routes must not rewrite them all after every etcd hiccup)."""
    client = EtcdClient([etcd_server.endpoint], timeout=1.0)
    pub = StatusPublisher(client, "n1", ttl=30)
    try:
        a, b, c = route("10.244.2.0/26"), route("10.244.3.0/26"), route("10.244.4.0/26")
        pub.write_routes(routes(a, b, c))
        before = {p: etcd.get(k.RouteKey("n1", x.cidr).path) for p, x in (("a", a), ("b", b))}
        etcd_server.kill()
        try:
            with pytest.raises(DatastoreError):
                pub.write_routes(routes(a, b))
        finally:
            etcd_server.start()
        b2 = route("10.244.3.0/26", "192.168.77.99")
        assert eventually(lambda: pub.publish_routes(routes(a, b2)), 10)
        assert stored(etcd) == {"10.244.2.0-26": "192.168.77.12", "10.244.3.0-26": "192.168.77.99"}
        after_a = etcd.get(k.RouteKey("n1", a.cidr).path)
        after_b = etcd.get(k.RouteKey("n1", b.cidr).path)
        assert before["a"] is not None and after_a is not None and after_b is not None and before["b"] is not None
        assert after_a.mod_revision == before["a"].mod_revision  # unchanged: not rewritten
        assert after_b.mod_revision > before["b"].mod_revision
    finally:
        pub.close()
        client.close()


def test_a_lost_lease_is_regranted_and_everything_republished_unasked(etcd: EtcdClient) -> None:
    pub = StatusPublisher(etcd, "n1", ttl=2)
    reporter = StatusReporter(pub, FAST).start()
    try:
        peer = m.BGPPeerStatus("n1", "192.168.77.12", "node-to-node mesh", "Established", since="t")
        reporter.offer_routes(routes(route("10.244.2.0/26")))
        reporter.offer_peers({peer.peer_ip: peer})
        reporter.offer_agent(m.AgentStatus("n1", True, 3))
        assert reporter.wait_idle(5)
        kv = etcd.get(k.AgentStatusKey("n1").path)
        assert kv is not None
        etcd.revoke(kv.lease)  # etcd forgot us (it was away for longer than the TTL): every key is gone

        def republished() -> bool:
            agent = etcd.get(k.AgentStatusKey("n1").path)
            return (
                agent is not None
                and agent.lease not in (0, kv.lease)
                and etcd.get(k.RouteKey("n1", "10.244.2.0/26").path) is not None
                and etcd.get(k.BGPPeerStatusKey("n1", peer.peer_ip).path) is not None
            )

        assert eventually(republished, 10)  # no new offer was needed
    finally:
        reporter.stop()
        pub.close()
    assert etcd.get(k.AgentStatusKey("n1").path) is None  # closing revokes the new lease too
