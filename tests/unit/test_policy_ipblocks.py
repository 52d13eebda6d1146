"""The ipBlocks of one peer list share one hash:net set (one rule per port, not one per CIDR), and that set admits
exactly what Kubernetes says: an address any block's CIDR holds and that block's excepts do not."""

from __future__ import annotations

import ipaddress
import random

import pytest

from agent.calc.policy import compile_node, compile_policies
from agent.calc.policy.chains import policy_chain
from agent.calc.policy.explain import explain, resolve_side, set_contains
from agent.calc.policy.resolve import _block_members
from agent.calc.policy.spec import INGRESS, IpBlock
from agent.calc.state import IpSet
from tests.unit.policy_world import policy, snapshot


def _random_blocks(rng: random.Random) -> list[IpBlock]:
    blocks = []
    for _ in range(rng.randrange(1, 7)):
        prefix = rng.randrange(0, 31) if rng.random() < 0.1 else rng.randrange(20, 31)
        net = ipaddress.IPv4Network((f"10.0.{rng.randrange(0, 8)}.{rng.randrange(0, 256)}", prefix), strict=False)
        if prefix == 0:
            net = ipaddress.IPv4Network("0.0.0.0/0")
        excepts = []
        for _ in range(rng.choice([0, 0, 1, 2, 3])):
            if net.prefixlen >= 32:
                break
            sub = rng.randrange(net.prefixlen + 1, 33)
            cut = ipaddress.IPv4Network(
                (int(net.network_address) + rng.randrange(net.num_addresses), sub), strict=False
            )
            excepts.append(str(cut))
        blocks.append(IpBlock(str(net), tuple(excepts)))
    return blocks


def _admits(blocks: list[IpBlock], ip: str) -> bool:
    a = ipaddress.IPv4Address(ip)
    return any(
        a in ipaddress.IPv4Network(b.cidr) and not any(a in ipaddress.IPv4Network(e) for e in b.excepts) for b in blocks
    )


@pytest.mark.parametrize("seed", range(300))
def test_one_set_admits_exactly_the_blocks(seed: int) -> None:
    rng = random.Random(seed)
    blocks = _random_blocks(rng)
    members = _block_members(blocks)
    ipset = IpSet("podnet-b-test", "hash:net", frozenset(members))
    assert not any(m.startswith("0.0.0.0/0") for m in members)  # the kernel's hash:net cannot hold a /0
    positive = {m for m in members if not m.endswith(" nomatch")}
    assert not {m.removesuffix(" nomatch") for m in members if m.endswith(" nomatch")} & positive
    probes = [
        str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.0.0.0")) + rng.randrange(8 * 256))) for _ in range(200)
    ]
    for b in blocks:  # the edges of every block and except
        for cidr in (b.cidr, *b.excepts):
            n = ipaddress.IPv4Network(cidr)
            probes += [str(n.network_address), str(n.broadcast_address)]
    probes += ["8.8.8.8", "203.0.113.1"]
    for ip in probes:
        assert set_contains(ipset, ip, "TCP", 80) == _admits(blocks, ip), (ip, blocks, members)


def test_a_12000_cidr_allow_list_is_one_set_and_one_rule() -> None:
    rng = random.Random(7)
    cidrs = set()
    while len(cidrs) < 12_000:
        prefix = rng.randrange(16, 33)
        addr = rng.randrange(1 << 24, 223 << 24)
        cidrs.add(str(ipaddress.IPv4Network((addr, prefix), strict=False)))
    peers = [{"ipBlock": {"cidr": c}} for c in sorted(cidrs)]
    peers[0] = {"ipBlock": {"cidr": "100.64.0.0/10", "except": ["100.64.1.0/24"]}}
    spec = {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"from": peers, "ports": [{"port": 443}]}]}
    snap = snapshot(policy("nsa", "customers", spec))
    result = compile_node(snap, "node1")
    assert result.statuses[("nsa", "customers")].accepted
    block_sets = [s for s in result.state.ipsets.values() if s.type == "hash:net"]
    assert len(block_sets) == 1
    chain = result.state.tables["filter"][policy_chain("nsa/customers", INGRESS)]
    assert sum("--set-xmark" in r for r in chain.rules) == 1
    # And it means what it says (explain evaluates the same set as the kernel gets).
    c = compile_policies(snap)
    blocks = [IpBlock(p["ipBlock"]["cidr"], tuple(p["ipBlock"].get("except", ()))) for p in peers]
    probes = ["100.64.1.9", "100.64.2.9", "8.8.8.8"]
    probes += [str(ipaddress.IPv4Network(x).network_address) for x in sorted(cidrs)[1:50]]
    for ip in probes:
        got = explain(c, resolve_side(c, ip), resolve_side(c, "nsa/a1"), "TCP", 443).allowed
        assert got == _admits(blocks, ip), ip
