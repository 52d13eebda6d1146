"""The incremental compiler gives exactly what a fresh compile of the same snapshot gives, across random sequences
of changes (pods relabelled, moved, added, deleted; endpoints; policies added, edited, broken, deleted; namespace
labels), for every node's DataplaneState, every ipset and every policy's selection and status."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest

from agent.cache import Cache
from agent.calc.policy.chains import build_state
from agent.calc.policy.resolve import REBUILD_THRESHOLD, PolicyCompiler, compile_policies
from agent.calc.snapshot import Snapshot
from datastore import codec
from datastore import keys as k
from datastore import model as m
from datastore.watcher import Deleted, Malformed, Updated
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


def _feed(cache: Cache, old: Snapshot, new: Snapshot) -> None:
    """The watcher updates that take ``cache`` from ``old`` to ``new`` (in a random-ish but fixed order)."""
    for name in ("namespaces", "pods", "endpoints", "policies"):
        before, after = getattr(old, name), getattr(new, name)
        for ident in sorted(set(before) | set(after)):
            value = after.get(ident)
            if value is None:
                key = codec.key_of(before[ident])
                cache.apply("", Deleted(key, key.path, new.revision))
            elif before.get(ident) is not value:
                key = codec.key_of(value)
                cache.apply("", Updated(key, key.path, value, new.revision))
    for ident in sorted(set(old.broken_policies) | set(new.broken_policies)):
        key = k.PolicyKey(*ident)
        reason = new.broken_policies.get(ident)
        if reason is not None and reason != old.broken_policies.get(ident):
            cache.apply("", Malformed(key, key.path, reason, new.revision))
        elif reason is None and ident not in new.policies:
            cache.apply("", Deleted(key, key.path, new.revision))


@pytest.mark.parametrize("seed", range(15))
def test_incremental_through_the_cache_journal_equals_fresh(seed: int) -> None:
    """The agent's path: snapshots of one cache, changes told by its journal (not by comparing maps)."""
    rng = random.Random(1000 + seed)
    cache = Cache(None)
    model = replace(snapshot(), broken_policies={})
    _feed(cache, Snapshot(), model)
    inc = PolicyCompiler()
    first = cache.snapshot()
    assert first.journal is not None
    assert_same(inc, first)
    for step in range(40):
        model = mutate(rng, model, 1 if step % 5 else rng.randrange(2, 6))
        _feed(cache, cache.snapshot(), model)
        snap = cache.snapshot()
        assert snap.changes_since(first) is not None
        assert dict(snap.pods) == dict(model.pods) and dict(snap.endpoints) == dict(model.endpoints)
        assert dict(snap.broken_policies) == dict(model.broken_policies)
        assert_same(inc, snap)
        for node in ("node1", "node2"):
            assert snap.local_endpoints(node) == [ep for key, ep in sorted(model.endpoints.items()) if key[0] == node]
