"""Random policies over the test cluster: for every pair of endpoints and a few ports, the verdict explain gives
equals the verdict of the compiled chains followed in the netfilter model. Catches what a hand-written table
misses (combinations of peers, ports, directions and namespaces)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from agent.calc.policy import compile_node, compile_policies
from agent.calc.policy.explain import explain, resolve_side
from tests.unit import policy_world as w
from tests.unit.test_policy_dataplane_model import deliver

SELECTORS: list[dict[str, Any]] = [
    {},
    {"matchLabels": {"app": "web"}},
    {"matchLabels": {"app": "client"}},
    {"matchExpressions": [{"key": "tier", "operator": "Exists"}]},
    {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["db", "web"]}]},
    {"matchExpressions": [{"key": "app", "operator": "In", "values": ["db", "client"]}]},
]
NS_SELECTORS: list[dict[str, Any]] = [{}, {"matchLabels": {"app": "nsb"}}, {"matchLabels": {"team": "x"}}]
BLOCKS = [
    {"cidr": "198.51.100.0/24"},
    {"cidr": "198.51.100.0/24", "except": ["198.51.100.128/25"]},
    {"cidr": "0.0.0.0/0", "except": ["10.244.1.0/24"]},
    {"cidr": "10.244.2.0/24"},
]
PORTS: list[dict[str, Any]] = [
    {"port": 80},
    {"port": 53, "protocol": "UDP"},
    {"port": "http"},
    {"port": "dns", "protocol": "UDP"},
    {"port": 8000, "endPort": 8100},
    {"protocol": "UDP"},
]
PROBES = [("tcp", 80), ("udp", 53), ("tcp", 8080), ("tcp", 9090), ("tcp", 8050)]
ENDS = [*w.PODS, w.OUTSIDE, w.OUTSIDE_HIGH, "192.168.77.11", "192.168.77.12"]


def peer(rng: random.Random) -> dict[str, Any]:
    kind = rng.randrange(4)
    if kind == 0:
        return {"podSelector": rng.choice(SELECTORS)}
    if kind == 1:
        return {"namespaceSelector": rng.choice(NS_SELECTORS)}
    if kind == 2:
        return {"namespaceSelector": rng.choice(NS_SELECTORS), "podSelector": rng.choice(SELECTORS)}
    return {"ipBlock": rng.choice(BLOCKS)}


def rule(rng: random.Random, peers_field: str) -> dict[str, Any]:
    r: dict[str, Any] = {}
    if rng.random() < 0.7:
        r[peers_field] = [peer(rng) for _ in range(rng.randrange(1, 3))]
    if rng.random() < 0.6:
        r["ports"] = rng.sample(PORTS, rng.randrange(1, 3))
    return r


def spec(rng: random.Random) -> dict[str, Any]:
    s: dict[str, Any] = {"podSelector": rng.choice(SELECTORS)}
    if rng.random() < 0.8:
        s["ingress"] = [rule(rng, "from") for _ in range(rng.randrange(0, 3))]
    if rng.random() < 0.5:
        s["egress"] = [rule(rng, "to") for _ in range(rng.randrange(0, 3))]
    if rng.random() < 0.5:
        s["policyTypes"] = rng.choice([["Ingress"], ["Egress"], ["Ingress", "Egress"]])
    return s


@pytest.mark.parametrize("seed", range(20))
def test_random_policies_explain_equals_chains(seed: int) -> None:
    rng = random.Random(seed)
    policies = [
        w.policy(rng.choice(["nsa", "nsb", "nsc", "default"]), f"r{i}", spec(rng)) for i in range(rng.randrange(1, 5))
    ]
    snap = w.snapshot(*policies)
    c = compile_policies(snap)
    assert all(s.accepted for s in c.statuses.values()), c.statuses
    states = {node: compile_node(snap, node).state for node in ("node1", "node2")}
    wrong = []
    for src in ENDS:
        for dst in ENDS:
            if src == dst or (src not in w.PODS and dst not in w.PODS):
                continue
            for proto, port in PROBES:
                want = explain(c, resolve_side(c, src), resolve_side(c, dst), proto.upper(), port).allowed
                got, _ = deliver(states, src, dst, proto, port)
                if got != want:
                    wrong.append((src, dst, proto, port, "explain", want, "chains", got))
    assert wrong == [], policies
