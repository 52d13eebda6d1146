"""The status publisher against a real etcd: lease-bound route/peer/agent status, diffs, leftovers, lease loss."""

from __future__ import annotations

import json

import pytest

from agent.status import StatusPublisher
from datastore import keys as k
from datastore import model as m
from datastore.etcd import EtcdClient
from testbed.wait import eventually

pytestmark = pytest.mark.integration


def stored(etcd: EtcdClient, prefix: str) -> dict[str, dict[str, object]]:
    kvs, _ = etcd.get_prefix(prefix)
    return {kv.key: json.loads(kv.value) for kv in kvs}


def route(cidr: str, via: str | None = "192.168.77.12") -> m.RouteStatus:
    return m.RouteStatus("n1", cidr, "remote-block", via=via, dev="eth0", learned_from=via)


def test_routes_are_published_updated_and_removed_under_the_lease(etcd: EtcdClient) -> None:
    pub = StatusPublisher(etcd, "n1", ttl=5)
    try:
        a, b = route("10.244.2.0/26"), route("10.244.3.0/26", "192.168.77.13")
        assert pub.publish_routes({a.cidr: a, b.cidr: b})
        got = stored(etcd, "/podnet/v1/routes/n1/")
        assert set(got) == {"/podnet/v1/routes/n1/10.244.2.0-26", "/podnet/v1/routes/n1/10.244.3.0-26"}
        assert got["/podnet/v1/routes/n1/10.244.3.0-26"]["via"] == "192.168.77.13"
        kv = etcd.get(k.RouteKey("n1", "10.244.2.0/26").path)
        assert kv is not None and kv.lease != 0

        # Unchanged values are not rewritten; a changed one is; a gone one is deleted.
        rev_a = kv.mod_revision
        b2 = route("10.244.3.0/26", "192.168.77.14")
        assert pub.publish_routes({a.cidr: a, b2.cidr: b2})
        kv = etcd.get(k.RouteKey("n1", "10.244.2.0/26").path)
        assert kv is not None and kv.mod_revision == rev_a
        assert stored(etcd, "/podnet/v1/routes/n1/")["/podnet/v1/routes/n1/10.244.3.0-26"]["via"] == "192.168.77.14"
        assert pub.publish_routes({a.cidr: a})
        assert list(stored(etcd, "/podnet/v1/routes/n1/")) == ["/podnet/v1/routes/n1/10.244.2.0-26"]

        peer = m.BGPPeerStatus("n1", "192.168.77.12", "node-to-node mesh", "Established", since="t")
        assert pub.publish_peers({peer.peer_ip: peer})
        agent = m.AgentStatus("n1", in_sync=True, revision=3, router_id="192.168.77.11", as_number=64512)
        assert pub.publish_agent(agent)
        assert stored(etcd, "/podnet/v1/bgp/n1/peers/")["/podnet/v1/bgp/n1/peers/192.168.77.12"]["state"] == (
            "Established"
        )
        assert stored(etcd, "/podnet/v1/agents/")["/podnet/v1/agents/n1"]["inSync"] is True
    finally:
        pub.close()
    # Closing revokes the lease: everything this agent said is gone.
    assert stored(etcd, "/podnet/v1/routes/") == {}
    assert stored(etcd, "/podnet/v1/bgp/") == {}
    assert stored(etcd, "/podnet/v1/agents/") == {}


def test_a_previous_runs_leftovers_are_removed_and_other_nodes_untouched(etcd: EtcdClient) -> None:
    old = StatusPublisher(etcd, "n1", ttl=30)
    other = StatusPublisher(etcd, "n10", ttl=30)  # a node whose name starts like ours
    try:
        old.publish_routes({"10.244.9.0/26": route("10.244.9.0/26")})
        theirs = m.RouteStatus("n10", "10.244.10.0/26", "local-block")
        other.publish_routes({theirs.cidr: theirs})
        old.close(revoke=False)  # as if the agent crashed: its lease is still alive for a while

        new = StatusPublisher(etcd, "n1", ttl=30)
        try:
            a = route("10.244.2.0/26")
            new.publish_routes({a.cidr: a})
            assert set(stored(etcd, "/podnet/v1/routes/")) == {
                "/podnet/v1/routes/n1/10.244.2.0-26",
                "/podnet/v1/routes/n10/10.244.10.0-26",
            }
        finally:
            new.close()
    finally:
        other.close()


def test_status_is_republished_after_the_lease_is_lost(etcd: EtcdClient) -> None:
    pub = StatusPublisher(etcd, "n1", ttl=2)
    try:
        a = route("10.244.2.0/26")
        pub.publish_routes({a.cidr: a})
        kv = etcd.get(k.RouteKey("n1", "10.244.2.0/26").path)
        assert kv is not None
        etcd.revoke(kv.lease)  # etcd forgot us (e.g. it was unreachable for longer than the TTL)
        assert stored(etcd, "/podnet/v1/routes/") == {}
        assert pub._lease is not None
        assert eventually(pub._lease.lost.is_set, timeout=5)
        assert pub.publish_routes({a.cidr: a})
        again = etcd.get(k.RouteKey("n1", "10.244.2.0/26").path)
        assert again is not None and again.lease not in (0, kv.lease)
    finally:
        pub.close()
