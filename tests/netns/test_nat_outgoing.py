"""natOutgoing in the kernel (the writer fed by etcd, as a process): a pod of a natOutgoing pool reaches an outside
host, which sees the node's address; traffic to another pod or to another node keeps the pod's address; switching the
flag off and on in etcd takes effect without a restart (off: the nat chain, jump and sets are gone); a restarted
writer adopts the nat chain without rewriting it; ``--remove`` removes it.

The outside host (203.0.113.10, a documentation address) sits behind the underlay's router, which has no route to
the pods: without masquerading, its answers have nowhere to go."""

from __future__ import annotations

import re
import sys
import threading

import pytest

from datastore import model as m
from datastore.etcd import EtcdClient
from datastore.store import Store
from testbed.etcd_server import EtcdServer
from testbed.netns import Netns, NetnsBed, Underlay, sh
from testbed.wait import eventually
from tests.netns.test_dataplane_etcd import NODE, put_pod, writer

pytestmark = [pytest.mark.netns, pytest.mark.integration]
POOL = "10.244.0.0/16"
OUTSIDE = "203.0.113.10"
UDP_PORT = 7070
TCP_PORT = 8080


def outside_host(bed: NetnsBed, underlay: Underlay) -> Netns:
    ns = bed.netns("outside")
    sh("ip", "link", "add", "eth0", "netns", ns.name, "type", "veth", "peer", "name", "o-ul", "netns", underlay.ns.name)
    underlay.ns.ip("addr", "add", "203.0.113.1/24", "dev", "o-ul")
    underlay.ns.ip("link", "set", "o-ul", "up")
    underlay.ns.sysctl("net.ipv4.ip_forward", "1")
    ns.ip("addr", "add", f"{OUTSIDE}/24", "dev", "eth0")
    ns.ip("link", "set", "eth0", "up")
    ns.ip("route", "add", "default", "via", "203.0.113.1")
    return ns


class Sources:
    """The source address of each UDP datagram a namespace receives (``testbed.probe count``)."""

    def __init__(self, ns: Netns) -> None:
        self.proc = ns.popen(sys.executable, "-m", "testbed.probe", "count", str(UDP_PORT))
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"
        self.seen: list[tuple[str, str]] = []  # (source address, payload)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            src, _, payload = line.strip().partition(" ")
            self.seen.append((src, payload))


def source_of(src: Netns, dst: str, sources: Sources, tag: str) -> str | None:
    """Send one datagram (a new flow, so it meets the nat rules afresh) and return the source it arrived with."""
    code = (
        "import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); "
        f"s.sendto(sys.argv[1].encode(), ({dst!r}, {UDP_PORT}))"
    )
    src.run(sys.executable, "-c", code, tag)
    if not eventually(lambda: any(p == tag for _, p in sources.seen), timeout=3):
        return None
    return next(a for a, p in sources.seen if p == tag)


def nat_save(ns: Netns) -> str:
    return ns.run("iptables-nft-save", "-t", "nat").stdout


def test_nat_outgoing_masquerades_to_the_outside_only_and_follows_the_flag(
    netns_bed: NetnsBed, etcd: EtcdClient, etcd_server: EtcdServer
) -> None:
    ul = netns_bed.underlay()
    node = netns_bed.node(NODE, ul, 11)
    other = netns_bed.node("n2", ul, 12)
    outside = outside_host(netns_bed, ul)
    a = netns_bed.pod(node, "nsa", "a", "10.244.0.2")
    b = netns_bed.pod(node, "nsa", "b", "10.244.0.3")
    outside.listen("tcp", TCP_PORT)
    at_outside, at_b, at_other = Sources(outside), Sources(b.ns), Sources(other.ns)
    store = Store(etcd)
    store.put(m.Node(NODE, node.ip))
    store.put(m.Node("n2", other.ip))
    put_pod(store, a, {"app": "a"})
    put_pod(store, b, {"app": "b"})
    store.put(m.IPPool(POOL, nat_outgoing=True))
    tags = (f"t{i}" for i in range(10_000))

    with writer(etcd_server.endpoint, node.ns.name) as w:
        assert "full" in w.next_sync()
        assert a.ns.connect("tcp", OUTSIDE, TCP_PORT)
        assert source_of(a.ns, OUTSIDE, at_outside, next(tags)) == node.address
        assert source_of(a.ns, b.ip, at_b, next(tags)) == a.ip  # to a pod: the pod's own address
        assert source_of(a.ns, other.address, at_other, next(tags)) == a.ip  # to another node: likewise
        assert "-A POSTROUTING -j podnet-POSTROUTING" in nat_save(node.ns)

        # Off in etcd: the pod's own address goes out, and the outside host cannot answer it.
        store.put(m.IPPool(POOL, nat_outgoing=False))
        assert eventually(lambda: source_of(a.ns, OUTSIDE, at_outside, next(tags)) == a.ip, timeout=10)
        assert not a.ns.connect("tcp", OUTSIDE, TCP_PORT, timeout=0.5)
        assert eventually(lambda: "podnet" not in nat_save(node.ns), timeout=10)
        assert "podnet-masq-pools" not in node.ns.run("ipset", "list", "-n").stdout

        # On again: masqueraded again.
        store.put(m.IPPool(POOL, nat_outgoing=True))
        assert eventually(lambda: source_of(a.ns, OUTSIDE, at_outside, next(tags)) == node.address, timeout=10)
        assert a.ns.connect("tcp", OUTSIDE, TCP_PORT)
        w.kill()

    # A restarted writer adopts the nat chain and sets: nothing rewritten, still masquerading.
    with writer(etcd_server.endpoint, node.ns.name) as w:
        assert re.search(r"full .* wrote=0$", w.next_sync())
        assert source_of(a.ns, OUTSIDE, at_outside, next(tags)) == node.address
    node.ns.run(sys.executable, "-m", "agent.dataplane.run", "--remove", "--iptables-backend", "nft")
    assert "podnet" not in nat_save(node.ns)
    assert "podnet" not in node.ns.run("ipset", "list", "-n").stdout
