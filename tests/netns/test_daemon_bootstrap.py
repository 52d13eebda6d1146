"""Node bootstrap against the real kernel: the sysctls written in a node namespace (read back with
``ip netns exec NS sysctl``), the tunnel device's setting once the device exists, the machine's own namespace
untouched; the address watcher sees the node's address change in the namespace and the node record in etcd follows,
keeps the old address while none can be found, comes back when deleted and gets a tunnel address when a VXLAN pool
is added."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import pytest

from agent.calc.routes import vtep_mac
from daemon.autodetect import detect, parse_method
from daemon.bootstrap import AddressWatcher, SysctlResult, register_node, set_sysctls
from daemon.threads import Threads
from datastore import keys as k
from datastore import model as m
from datastore.etcd import EtcdClient
from datastore.store import Store
from ipam.pools import add_pool
from testbed.netns import NetnsBed, NodeNs

pytestmark = pytest.mark.netns


def read(node: NodeNs, name: str) -> str:
    return node.ns.run("sysctl", "-n", name).stdout.strip()


def root_value(name: str) -> str:
    with open("/proc/sys/" + name.replace(".", "/")) as fh:
        return fh.read().strip()


def wait_for(what: str, check: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def node(netns_bed: NetnsBed) -> Iterator[NodeNs]:
    n1 = netns_bed.node("n1", netns_bed.underlay(), 11)
    n1.ns.sysctl("net.ipv4.ip_forward", "0")  # the test bed turns it on; start from a node that has it off
    yield n1


def add_vxlan(node: NodeNs) -> None:
    node.ns.ip("link", "add", "vxlan.podnet", "type", "vxlan", "id", "4096", "dstport", "4789", "dev", "eth0")
    node.ns.sysctl("net.ipv4.conf.vxlan/podnet.rp_filter", "1")  # strict, whatever the kernel's default


def test_sysctls_are_set_in_the_node_namespace_and_reported(node: NodeNs) -> None:
    root_forward = root_value("net.ipv4.ip_forward")
    all_rp = read(node, "net.ipv4.conf.all.rp_filter")
    assert set_sysctls(node.ns.name, "vxlan") == [
        SysctlResult("net.ipv4.ip_forward", "0", "1"),
        SysctlResult("net.ipv4.conf.vxlan/podnet.rp_filter", absent=True),  # the route writer makes it later
    ]
    assert read(node, "net.ipv4.ip_forward") == "1"
    add_vxlan(node)
    assert set_sysctls(node.ns.name, "vxlan") == [
        SysctlResult("net.ipv4.ip_forward", "1", "1"),
        SysctlResult("net.ipv4.conf.vxlan/podnet.rp_filter", "1", "2"),
    ]
    assert read(node, "net.ipv4.conf.vxlan/podnet.rp_filter") == "2"
    assert read(node, "net.ipv4.conf.all.rp_filter") == all_rp  # loosened on the tunnel only, not everywhere
    assert root_value("net.ipv4.ip_forward") == root_forward  # the machine's namespace untouched


def test_no_namespace_is_an_error_per_sysctl() -> None:
    results = set_sysctls("pnt-no-such-namespace", "none")
    assert [(r.name, r.error is not None) for r in results] == [("net.ipv4.ip_forward", True)]
    assert "pnt-no-such-namespace" in (results[0].error or "")


def test_the_watcher_follows_the_address_and_keeps_the_sysctls(
    node: NodeNs, etcd: EtcdClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="daemon.bootstrap")
    method = parse_method("first-found")
    first = detect(method, node.ns.name)
    register_node(etcd, "n1", first, None)
    Store(etcd).put(m.Node("n1", first.address.with_prefixlen, as_number=64600, labels={"rack": "a"}))  # operator
    threads = Threads()
    watcher = AddressWatcher(
        etcd, "n1", method, first, threads, netns=node.ns.name, encapsulation="vxlan", interval=0.1
    )
    watcher.start()
    try:

        def record() -> m.Node:
            got = Store(etcd).get(k.NodeKey("n1"), m.Node)
            assert got is not None
            return got.value

        node.ns.ip("addr", "del", "192.168.77.11/24", "dev", "eth0")
        # No global address at all: the record keeps the last one, the watcher says why.
        wait_for("the watcher to report the failed detection", lambda: "keeping" in watcher.health().reason)
        assert watcher.health().ready and watcher.health().alive
        assert record().ip == "192.168.77.11/24"

        node.ns.ip("addr", "add", "192.168.77.21/24", "dev", "eth0")
        wait_for("the node record to follow the address", lambda: record().ip == "192.168.77.21/24")
        assert record() == m.Node("n1", "192.168.77.21/24", as_number=64600, labels={"rack": "a"})
        assert watcher.registered.address.with_prefixlen == "192.168.77.21/24"
        assert any(
            "address changed 192.168.77.11/24 on eth0 → 192.168.77.21/24 on eth0 (first-found)" in r.message
            for r in caplog.records
        )
        wait_for("health to show the new address", lambda: "192.168.77.21/24" in watcher.health().reason)

        # The record deleted, then a VXLAN pool added after start-up: registered again, with a tunnel address.
        etcd.delete(k.NodeKey("n1").path)
        wait_for("the record to come back", lambda: Store(etcd).get(k.NodeKey("n1"), m.Node) is not None)
        assert record() == m.Node("n1", "192.168.77.21/24")
        add_pool(Store(etcd), m.IPPool("10.244.0.0/16", encapsulation="vxlan"))
        wait_for("a vxlan tunnel address", lambda: record().vxlan_address is not None)
        assert record().vxlan_mac == vtep_mac(record())
        assert any("record is missing: registered again" in r.message for r in caplog.records)

        # ip_forward reset by someone, and the tunnel device made after start: both set in the next rounds.
        node.ns.sysctl("net.ipv4.ip_forward", "0")
        add_vxlan(node)
        wait_for("the tunnel's rp_filter", lambda: read(node, "net.ipv4.conf.vxlan/podnet.rp_filter") == "2")
        wait_for("ip_forward back on", lambda: read(node, "net.ipv4.ip_forward") == "1")
        assert any("net.ipv4.conf.vxlan/podnet.rp_filter: 1 → 2" in r.message for r in caplog.records)
    finally:
        started = time.monotonic()
        watcher.stop(time.monotonic() + 5.0)
    assert time.monotonic() - started < 1.0
    assert threads.deaths(watcher.name) == [] and threads.running(watcher.name) == []
    assert watcher.health().reason == "stopped"
