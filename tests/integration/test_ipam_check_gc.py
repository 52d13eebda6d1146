"""`agentctl ipam check` and GC against a real etcd: each kind of problem is found, leaks are released only after
the grace period and a second look, and nothing in use is ever released."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from agent.ctl.main import cli
from datastore import codec
from datastore import keys as k
from datastore import model as m
from datastore.etcd import EtcdClient
from datastore.store import Store
from ipam.allocator import Ipam
from ipam.check import check
from ipam.gc import LeakCollector
from ipam.pools import add_pool
from testbed.etcd_server import EtcdServer

pytestmark = pytest.mark.integration


def ctl(server: EtcdServer, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--etcd-endpoints", server.endpoint, "ipam", *args])
    return result.exit_code, result.output


def endpoint(pod: str, ip: str, handle: str | None) -> m.Endpoint:
    return m.Endpoint("n1", "nsa", pod, "eth0", "cali0", (f"{ip}/32",), handle=handle)


def test_leak_needs_endpoint_and_pod_gone(etcd: EtcdClient) -> None:
    store = Store(etcd)
    add_pool(store, m.IPPool("10.244.0.0/16"))
    ipam = Ipam(etcd)
    a = ipam.auto_assign("h-a", "n1", pod="nsa/a")
    b = ipam.auto_assign("h-b", "n1", pod="nsa/b")
    ipam.auto_assign("h-c", "n1", pod="nsa/c")
    store.put(endpoint("a", a, "h-a"))  # in use through its endpoint
    store.put(m.Pod("nsa", "b", ips=(b,), node="n1"))  # in use: the pod still lists the address
    store.put(m.Pod("nsa", "c", ips=("10.244.9.9",), node="n1"))  # the pod moved on to another address
    report = check(etcd)
    assert report.leaked_handles == {"h-c"} and report.problems == ()


def test_every_problem_kind_is_reported(etcd_server: EtcdServer, etcd: EtcdClient) -> None:
    store = Store(etcd)
    add_pool(store, m.IPPool("10.244.0.0/16"))
    ipam = Ipam(etcd)
    a = ipam.auto_assign("h-a", "n1", pod="nsa/a")
    store.put(endpoint("a", a, "h-a"))
    assert ctl(etcd_server, "check") == (0, "IPAM is consistent (revision " + str(check(etcd).revision) + ").\n")
    store.put(endpoint("ghost", "10.244.0.50", "h-ghost"))  # endpoint but not allocated
    store.put(endpoint("twin", a, None))  # a second endpoint on a's address
    store.put(m.Handle("h-empty", (), "nsa/e", "n1"))  # handle with no addresses
    # A block allocation whose handle record is missing (only a hand edit or a foreign writer can do this).
    blk = store.get(k.BlockKey("10.244.0.0/26"), m.Block)
    assert blk is not None
    allocs = {**blk.value.allocations, 7: m.Allocation("h-orphan", "nsa/o")}
    etcd.put(blk.path, codec.encode(m.Block(blk.value.cidr, blk.value.affinity, allocs)))
    report = check(etcd)
    kinds = sorted({p.kind for p in report.problems})
    assert kinds == ["allocation-without-handle", "endpoint-not-allocated", "handle-without-ips", "ip-in-two-places"]
    assert report.leaked_handles == {"h-orphan"}
    code, out = ctl(etcd_server, "check", "-o", "json")
    assert code == 1
    data = json.loads(out)
    assert data["leakedHandles"] == ["h-orphan"] and not data["ok"]
    code, out = ctl(etcd_server, "check")
    assert code == 1 and "h-orphan" in out and "10.244.0.50, which is not allocated" in out


def test_gc_waits_for_grace_and_releases_only_persistent_leaks(etcd: EtcdClient) -> None:
    store = Store(etcd)
    add_pool(store, m.IPPool("10.244.0.0/16"))
    ipam = Ipam(etcd)
    now = [1000.0]
    gc = LeakCollector(ipam, grace=30.0, clock=lambda: now[0])
    ipam.auto_assign("h-slow", "n1", pod="nsa/slow")  # an ADD in flight: endpoint not written yet
    leaked = ipam.auto_assign("h-dead", "n1", pod="nsa/dead")
    assert gc.run_once() == []  # first look: both are candidates, none is old enough
    now[0] += 10
    store.put(endpoint("slow", "10.244.0.0", "h-slow"))  # the ADD finished
    assert gc.run_once() == []
    now[0] += 25  # h-dead leaked for 35 s now
    assert gc.run_once() == ["h-dead"]
    assert store.get(k.HandleKey("h-dead"), m.Handle) is None
    assert check(etcd).ok
    assert ipam.auto_assign("h-new", "n1", pod="nsa/new") == leaked  # the address is free again


def test_release_and_pools_commands(etcd_server: EtcdServer, etcd: EtcdClient) -> None:
    assert ctl(etcd_server, "pools", "add", "10.244.0.0/16", "--block-size", "28", "--node-selector", "zone=a")[0] == 0
    code, out = ctl(etcd_server, "pools", "add", "10.244.1.0/24")
    assert code == 1 and "overlaps the existing pool 10.244.0.0/16" in out
    code, out = ctl(etcd_server, "pools", "add", "10.244.1.1/24")
    assert code != 0 and "has host bits set" in out
    code, out = ctl(etcd_server, "pools", "list", "-o", "json")
    assert json.loads(out) == [m.IPPool("10.244.0.0/16", 28, node_selector={"zone": "a"}).to_json()]
    ipam = Ipam(etcd)
    ip = ipam.auto_assign("h-a", "n1", node_labels={"zone": "a"})
    ipam.auto_assign("h-b", "n1", node_labels={"zone": "a"})
    code, out = ctl(etcd_server, "show")
    assert code == 0 and "10.244.0.0/16" in out and "n1" in out
    assert ctl(etcd_server, "pools", "delete", "10.244.0.0/16")[0] == 1
    assert ctl(etcd_server, "release", "--ip", ip) == (0, f"released {ip} (handle h-a)\n")
    assert ctl(etcd_server, "release", "--ip", ip) == (0, f"{ip} was not allocated\n")
    assert ctl(etcd_server, "release", "--handle", "h-b") == (0, "released 10.244.0.1 from h-b\n")
    assert ctl(etcd_server, "release", "--handle", "h-b") == (0, "handle h-b held nothing\n")
    assert ctl(etcd_server, "release")[0] == 2
    ipam.auto_assign("h-leak", "n1", pod="nsa/gone", node_labels={"zone": "a"})
    assert ctl(etcd_server, "gc", "--grace", "0") == (0, "released 1 leaked handle(s): h-leak\n")
    assert ctl(etcd_server, "gc", "--grace", "0") == (0, "released 0 leaked handle(s)\n")
    assert ctl(etcd_server, "pools", "delete", "10.244.0.0/16") == (0, "deleted pool 10.244.0.0/16\n")
    assert etcd.get_prefix("/podnet/v1/ipam/")[0] == []


def test_pool_add_takes_the_cluster_default_encapsulation(etcd_server: EtcdServer, etcd: EtcdClient) -> None:
    """ClusterConfig.encapsulation is the default of `agentctl ipam pools add` (a stored setting is never ignored)."""
    assert ctl(etcd_server, "pools", "add", "10.244.0.0/16") == (0, "added pool 10.244.0.0/16 (vxlan)\n")
    Store(etcd).put(m.ClusterConfig(encapsulation="none"))
    assert ctl(etcd_server, "pools", "add", "10.245.0.0/16") == (0, "added pool 10.245.0.0/16 (none)\n")
    assert ctl(etcd_server, "pools", "add", "10.246.0.0/16", "--encapsulation", "ipip")[1].endswith("(ipip)\n")
    code, out = ctl(etcd_server, "pools", "add", "fd00:10::/64", "--nat-outgoing")
    assert code == 2 and "natOutgoing is not supported on IPv6 pools" in out
    pools = {p.value.cidr: p.value.encapsulation for p in Store(etcd).list("/podnet/v1/ipam/pools/", m.IPPool)}
    assert pools == {"10.244.0.0/16": "vxlan", "10.245.0.0/16": "none", "10.246.0.0/16": "ipip"}
