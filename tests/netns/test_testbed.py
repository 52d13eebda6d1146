"""The network-namespace test bed itself: nodes on an underlay, pods wired like podnet's CNI, probes, cleanup."""

from __future__ import annotations

from testbed.netns import NetnsBed, list_netns


def test_pods_on_two_nodes_reach_each_other(netns_bed: NetnsBed) -> None:
    ul = netns_bed.underlay()
    n1 = netns_bed.node("n1", ul, 11)
    n2 = netns_bed.node("n2", ul, 12)
    a = netns_bed.pod(n1, "nsa", "a", "10.244.1.2")
    b = netns_bed.pod(n1, "nsa", "b", "10.244.1.3")
    c = netns_bed.pod(n2, "nsb", "c", "10.244.2.2")
    # Same node: via the cali veths and proxy ARP.
    assert a.ns.ping(b.ip)
    # Across nodes once each knows the other's block (what BGP will program).
    n1.ns.ip("route", "add", "10.244.2.0/26", "via", n2.address)
    n2.ns.ip("route", "add", "10.244.1.0/26", "via", n1.address)
    assert a.ns.ping(c.ip)
    c.ns.listen("tcp", 8080)
    c.ns.listen("udp", 5353)
    assert a.ns.connect("tcp", c.ip, 8080)
    assert a.ns.connect("udp", c.ip, 5353)
    assert not a.ns.connect("tcp", c.ip, 8081, timeout=0.5)  # refused: nothing listens
    assert not a.ns.connect("udp", c.ip, 5354, timeout=0.5)


def test_dropped_traffic_is_reported_as_unreachable(netns_bed: NetnsBed) -> None:
    ul = netns_bed.underlay()
    n1 = netns_bed.node("n1", ul, 11)
    a = netns_bed.pod(n1, "nsa", "a", "10.244.1.2")
    b = netns_bed.pod(n1, "nsa", "b", "10.244.1.3")
    b.ns.listen("tcp", 80)
    assert a.ns.connect("tcp", b.ip, 80)
    n1.ns.run("iptables", "-A", "FORWARD", "-d", b.ip, "-j", "DROP")
    assert not a.ns.connect("tcp", b.ip, 80, timeout=0.5)


def test_close_removes_every_namespace_and_process() -> None:
    bed = NetnsBed()
    try:
        ul = bed.underlay()
        n1 = bed.node("n1", ul, 11)
        pod = bed.pod(n1, "default", "p", "10.244.1.9")
        server = pod.ns.listen("tcp", 80)
        names = [ns.name for ns in bed.namespaces]
        assert set(names) <= set(list_netns())
    finally:
        bed.close()
    assert not set(names) & set(list_netns())
    assert server.proc.poll() is not None
