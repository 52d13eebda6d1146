"""The incremental compiler gives exactly what a fresh compile of the same snapshot gives, across random sequences
of changes (pods relabelled, moved, added, deleted; endpoints; policies added, edited, broken, deleted; namespace
labels), for every node's DataplaneState, every ipset and every policy's selection and status."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest

from agent.calc.policy.chains import build_state
from agent.calc.policy.resolve import REBUILD_THRESHOLD, PolicyCompiler, compile_policies
from agent.calc.snapshot import Snapshot
from datastore import model as m
from tests.unit.policy_world import snapshot

LABELS = [{"app": "web"}, {"app": "db"}, {"app": "client", "tier": "gold"}, {"tier": "silver"}, {}]
NAMESPACES = ["nsa", "nsb", "nsc", "default"]
SPECS: list[dict[str, Any]] = [
    {"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}]}]},
    {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"ports": [{"port": "http"}]}]},
    {
        "podSelector": {},
        "policyTypes": ["Egress"],
        "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"team": "x"}}}]}],
    },
    {
        "podSelector": {"matchExpressions": [{"key": "tier", "operator": "Exists"}]},
        "ingress": [{"from": [{"ipBlock": {"cidr": "198.51.100.0/24", "except": ["198.51.100.128/25"]}}]}],
    },
    {"podSelector": {}, "egress": [{"ports": [{"port": "dns", "protocol": "UDP"}]}]},
    {"podSelector": {"matchLabels": {"app": "db"}}, "ingress": [{"ports": [{"port": 0}]}]},  # rejected
    {
        "podSelector": {},
        "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"tier": "gold"}}}]}],
    },
]


def mutate(rng: random.Random, snap: Snapshot, n: int) -> Snapshot:
    pods, eps, pols, nss = dict(snap.pods), dict(snap.endpoints), dict(snap.policies), dict(snap.namespaces)
    broken = dict(snap.broken_policies)
    for _ in range(n):
        what = rng.randrange(10)
        if what == 0 and pods:  # relabel
            k = rng.choice(sorted(pods))
            pods[k] = replace(pods[k], labels=dict(rng.choice(LABELS)))
        elif what == 1:  # add a pod (with an endpoint when on node1)
            ns, name = rng.choice(NAMESPACES), f"x{rng.randrange(1000)}"
            ip = f"10.244.{rng.choice([1, 2])}.{rng.randrange(2, 250)}"
            node = "node1" if ip.startswith("10.244.1.") else "node2"
            ports = (m.NamedPort("http", rng.choice([80, 8080])), m.NamedPort("dns", 53, "UDP"))[: rng.randrange(3)]
            pods[(ns, name)] = m.Pod(ns, name, dict(rng.choice(LABELS)), (ip,), node, ports)
            eps[(node, ns, name, "eth0")] = m.Endpoint(
                node, ns, name, "eth0", f"cali{rng.randrange(16**11):011x}", (f"{ip}/32",)
            )
        elif what == 2 and pods:  # delete a pod, sometimes leaving its endpoint behind
            k = rng.choice(sorted(pods))
            del pods[k]
            if rng.random() < 0.7:
                for ek in [ek for ek in eps if (ek[1], ek[2]) == k]:
                    del eps[ek]
        elif what == 3 and eps:  # an endpoint changes its address
            ek = rng.choice(sorted(eps))
            eps[ek] = replace(eps[ek], ips=(f"10.244.{'1' if ek[0] == 'node1' else '2'}.{rng.randrange(2, 250)}/32",))
        elif what == 4:  # add or edit a policy
            ns, name = rng.choice(NAMESPACES), f"pol{rng.randrange(6)}"
            pols[(ns, name)] = m.Policy(ns, name, rng.choice(SPECS))
            broken.pop((ns, name), None)
        elif what == 5 and pols:
            del pols[rng.choice(sorted(pols))]
        elif what == 6:  # namespace labels
            ns = rng.choice(NAMESPACES)
            nss[ns] = m.Namespace(ns, rng.choice([{"team": "x"}, {"app": ns}, {}]))
        elif what == 7 and pods:  # a pod's object is replaced by an equal one (a no-op write)
            k = rng.choice(sorted(pods))
            pods[k] = replace(pods[k])
        elif what == 8:  # a policy key's stored value becomes unreadable, or an unreadable one goes
            key = (rng.choice(NAMESPACES), f"pol{rng.randrange(6)}")
            if key in broken and rng.random() < 0.5:
                del broken[key]
            else:
                pols.pop(key, None)
                broken[key] = rng.choice(["not valid JSON", "spec: expected an object"])
        elif what == 9 and nss:  # a namespace record goes (its pods wait for it when labels are read)
            del nss[rng.choice(sorted(nss))]
    return replace(
        snap,
        pods=pods,
        endpoints=eps,
        policies=pols,
        namespaces=nss,
        broken_policies=broken,
        revision=snap.revision + 1,
    )


def assert_same(inc: PolicyCompiler, snap: Snapshot) -> None:
    got = inc.update(snap)
    want = compile_policies(snap)
    assert got.ipsets == want.ipsets
    assert got.statuses == want.statuses
    assert got.policies == want.policies
    assert {k: v for k, v in got.selecting.items() if v} == {k: v for k, v in want.selecting.items() if v}
    assert got.world.pods == want.world.pods
    for node in ("node1", "node2"):
        assert build_state(got, snap, node) == build_state(want, snap, node)


@pytest.mark.parametrize("seed", range(25))
def test_incremental_equals_fresh(seed: int) -> None:
    rng = random.Random(seed)
    snap = snapshot()
    inc = PolicyCompiler()
    assert_same(inc, snap)
    for step in range(40):
        snap = mutate(rng, snap, 1 if step % 5 else rng.randrange(2, 6))
        assert_same(inc, snap)


def test_many_changes_rebuild() -> None:
    snap = snapshot()
    inc = PolicyCompiler()
    inc.update(snap)
    pods = {
        ("nsa", f"bulk{i}"): m.Pod("nsa", f"bulk{i}", {"app": "web"}, (f"10.244.3.{i % 250}",), "node2")
        for i in range(REBUILD_THRESHOLD + 1)
    }
    assert_same(inc, replace(snap, pods={**snap.pods, **pods}))
