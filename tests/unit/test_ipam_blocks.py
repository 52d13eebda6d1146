"""Pure IPAM pieces: block arithmetic, pool eligibility, and the check's analysis of a datastore view."""

from __future__ import annotations

import pytest

from datastore import model as m
from ipam import blocks as b
from ipam.check import IpamView, analyse


def test_pool_blocks_and_block_of_an_address() -> None:
    pool = m.IPPool("10.250.0.0/28", block_size=30)
    assert list(b.pool_blocks(pool)) == ["10.250.0.0/30", "10.250.0.4/30", "10.250.0.8/30", "10.250.0.12/30"]
    assert b.block_count(m.IPPool("10.244.0.0/16")) == 1024
    assert b.block_cidr_for(pool, "10.250.0.6") == "10.250.0.4/30"
    assert b.ordinal_of("10.250.0.4/30", "10.250.0.6") == 2
    with pytest.raises(ValueError, match="not in pool"):
        b.block_cidr_for(pool, "10.250.0.16")
    with pytest.raises(ValueError, match="not in block"):
        b.ordinal_of("10.250.0.4/30", "10.250.0.8")


def test_free_ordinals_use_every_address() -> None:
    block = m.Block("10.250.0.4/30", "node:n1", {0: m.Allocation("h0"), 2: m.Allocation("h2")})
    assert b.free_ordinals(block) == [1, 3]
    assert b.first_free(block) == 1
    full = m.Block("10.250.0.4/30", None, {i: m.Allocation(f"h{i}") for i in range(4)})
    assert b.first_free(full) is None


def test_overlap_and_eligibility() -> None:
    assert b.overlaps("10.244.0.0/16", "10.244.8.0/24")
    assert not b.overlaps("10.244.0.0/16", "10.245.0.0/16")
    assert not b.overlaps("10.244.0.0/16", "fd00::/64")
    pools = [
        m.IPPool("10.245.0.0/16", node_selector={"zone": "a"}),
        m.IPPool("10.244.0.0/16"),
        m.IPPool("10.246.0.0/16", disabled=True),
        m.IPPool("fd00:10::/64", block_size=122),
    ]
    assert [p.cidr for p in b.eligible_pools(pools, {"zone": "a"})] == ["10.244.0.0/16", "10.245.0.0/16"]
    assert [p.cidr for p in b.eligible_pools(pools, {"zone": "b"})] == ["10.244.0.0/16"]
    assert [p.cidr for p in b.eligible_pools(pools, {}, only="10.245.0.0/16")] == []
    assert b.pool_for(pools, "10.246.1.1") == pools[2]
    assert b.pool_for(pools, "192.0.2.1") is None


def view(**kw: object) -> IpamView:
    base: dict[str, object] = {"revision": 1, "blocks": [], "handles": {}, "endpoints": [], "pods": {}, "nodes": set()}
    base.update(kw)
    return IpamView(**base)  # type: ignore[arg-type]


def test_analyse_finds_leaks_only_when_endpoint_and_pod_are_gone() -> None:
    block = m.Block(
        "10.244.0.0/30",
        "node:n1",
        {0: m.Allocation("h0", "ns/a"), 1: m.Allocation("h1", "ns/b"), 2: m.Allocation("t", None, "tunnel")},
    )
    handles = {
        "h0": (m.Handle("h0", ("10.244.0.0",), "ns/a", "n1"), 5),
        "h1": (m.Handle("h1", ("10.244.0.1",), "ns/b", "n1"), 6),
        "t": (m.Handle("t", ("10.244.0.2",), None, "n1"), 7),
    }
    ep = m.Endpoint("n1", "ns", "a", "eth0", "cali0", ("10.244.0.0/32",), handle="h0")
    report = analyse(view(blocks=[block], handles=handles, endpoints=[ep], nodes={"n1"}))
    assert report.problems == () and report.leaked_handles == {"h1"}
    assert report.handle_revisions["h1"] == 6
    # The pod still exists and lists the address: not a leak. The node left: its tunnel address is.
    report = analyse(
        view(blocks=[block], handles=handles, endpoints=[ep], pods={"ns/b": m.Pod("ns", "b", ips=("10.244.0.1",))})
    )
    assert report.leaked_handles == {"t"}


def test_analyse_reports_contradictions() -> None:
    b1 = m.Block("10.244.0.0/30", "node:n1", {0: m.Allocation("h0")})
    b2 = m.Block("10.244.0.0/29", "node:n2", {0: m.Allocation("h9")})  # overlaps b1: the same address twice
    handles = {"h0": (m.Handle("h0", ("10.244.0.0",)), 1), "hx": (m.Handle("hx", ()), 2)}
    eps = [
        m.Endpoint("n1", "ns", "a", "eth0", "c", ("10.244.0.0/32",), handle="h0"),
        m.Endpoint("n1", "ns", "z", "eth0", "c", ("10.244.0.3/32",), handle="hz"),
    ]
    report = analyse(view(blocks=[b1, b2], handles=handles, endpoints=eps))
    got = {(p.kind, p.subject) for p in report.problems}
    assert ("ip-in-two-places", "10.244.0.0/30") in got  # overlapping blocks
    assert ("ip-in-two-places", "10.244.0.0") in got  # allocated twice
    assert ("allocation-without-handle", "10.244.0.0") in got  # h9 has no record
    assert ("handle-without-ips", "hx") in got
    assert ("endpoint-not-allocated", "n1/ns/z/eth0") in got
    assert not report.ok
