"""The guest is what the VM tier promises: a kernel with IPIP, where the test bed's nodes and pods work over tunl0.

These use plain ``ip`` commands on purpose: they check the tier and the kernel behaviour podnet relies on, not
podnet (test_agent_ipip.py does that with the agent's own code)."""

from __future__ import annotations

import json

import pytest

from testbed.netns import NetnsBed, NodeNs

pytestmark = pytest.mark.needs_ipip


def tunl0_counters(node: NodeNs) -> tuple[int, int]:
    """(rx, tx) packets of a node's tunl0."""
    link = json.loads(node.ns.ip("-j", "-s", "link", "show", "dev", "tunl0"))[0]
    return int(link["stats64"]["rx"]["packets"]), int(link["stats64"]["tx"]["packets"])


def test_every_new_namespace_has_a_fallback_tunl0(netns_bed: NetnsBed) -> None:
    # With ipip loaded, the kernel makes tunl0 in each namespace: podnet must adopt it, not create it.
    ns = netns_bed.netns("fresh")
    link = json.loads(ns.ip("-j", "-d", "link", "show", "dev", "tunl0"))[0]
    assert link["linkinfo"]["info_kind"] == "ipip"
    assert "UP" not in link["flags"]


def test_pods_on_two_nodes_talk_tcp_through_tunl0(netns_bed: NetnsBed) -> None:
    ul = netns_bed.underlay()
    n1 = netns_bed.node("n1", ul, 11)
    n2 = netns_bed.node("n2", ul, 12)
    a = netns_bed.pod(n1, "nsa", "a", "10.244.1.2")
    c = netns_bed.pod(n2, "nsb", "c", "10.244.2.2")
    for node, tunnel_ip, peer, block in (
        (n1, "10.244.1.1", n2, "10.244.2.0/26"),
        (n2, "10.244.2.1", n1, "10.244.1.0/26"),
    ):
        node.ns.ip("link", "set", "tunl0", "mtu", "1480", "up")
        node.ns.ip("addr", "add", f"{tunnel_ip}/32", "dev", "tunl0")
        node.ns.ip("route", "add", block, "via", peer.address, "dev", "tunl0", "onlink")
    before1, before2 = tunl0_counters(n1), tunl0_counters(n2)
    c.ns.listen("tcp", 8080)
    assert a.ns.connect("tcp", c.ip, 8080)
    after1, after2 = tunl0_counters(n1), tunl0_counters(n2)
    # The SYN left n1 and arrived at n2 encapsulated, and the answer came back the same way.
    assert after1[1] > before1[1] and after2[0] > before2[0]
    assert after2[1] > before2[1] and after1[0] > before1[0]
    # Without the tunnel route the pod is unreachable (the underlay knows nothing of pod addresses).
    n1.ns.ip("route", "del", "10.244.2.0/26")
    assert not a.ns.connect("tcp", c.ip, 8080, timeout=0.5)
