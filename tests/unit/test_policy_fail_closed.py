"""Fail closed: a pod whose labels the agent does not know (its pod record, or its namespace's record when a
namespaceSelector reads it, has not arrived) gets no traffic either way; a policy key whose value cannot be read
isolates its whole namespace both ways, while the namespace's valid policies keep allowing what they allow."""

from __future__ import annotations

from dataclasses import replace

from agent.calc.policy import compile_node, compile_policies
from agent.calc.policy.chains import endpoint_chain
from agent.calc.policy.explain import explain, resolve_side
from agent.calc.policy.spec import EGRESS, INGRESS
from agent.calc.snapshot import Snapshot
from tests.unit.policy_world import policy, snapshot

DENY_WEB = policy("nsa", "deny-web", {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"]})
FROM_TEAM_X = policy(
    "nsb",
    "from-team-x",
    {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "x"}}}]}]},
)


def _allowed(snap: Snapshot, src: str, dst: str) -> bool:
    c = compile_policies(snap)
    return explain(c, resolve_side(c, src), resolve_side(c, dst), "TCP", 80).allowed


def _without_pod_record(snap: Snapshot, ns: str, name: str) -> Snapshot:
    return replace(snap, pods={k: v for k, v in snap.pods.items() if k != (ns, name)})


def test_endpoint_without_pod_record_gets_no_traffic_either_way() -> None:
    # nsa/a1 (app=web, node1) is isolated by deny-web; before its pod record arrives, the agent cannot know that.
    full = snapshot(DENY_WEB)
    early = _without_pod_record(full, "nsa", "a1")
    assert not _allowed(early, "nsb/b2", "nsa/a1")
    assert not _allowed(early, "nsa/a1", "nsb/b2")
    # The kernel chains of its interface drop both ways, with the reason.
    state = compile_node(early, "node1").state.tables["filter"]
    iface = next(ep.host_iface for ep in early.endpoints.values() if ep.pod == "a1")
    for direction in (EGRESS, INGRESS):
        rules = state[endpoint_chain(iface, direction)].rules
        assert rules == ('-m comment --comment "pod record not yet known" -j DROP',)
    c = compile_policies(early)
    v = explain(c, resolve_side(c, "nsb/b2"), resolve_side(c, "nsa/a1"), "TCP", 80)
    assert "pod record not yet known" in v.reason
    # Once it arrives the normal verdicts apply: still denied in (deny-web), allowed out.
    assert not _allowed(full, "nsb/b2", "nsa/a1")
    assert _allowed(full, "nsa/a1", "nsb/b2")


def test_endpoint_without_pod_record_and_no_policy_waits_too() -> None:
    full = snapshot()
    early = _without_pod_record(full, "nsb", "b2")
    assert not _allowed(early, "nsa/a1", "nsb/b2")
    assert not _allowed(early, "nsb/b2", "nsa/a1")
    assert _allowed(full, "nsa/a1", "nsb/b2") and _allowed(full, "nsb/b2", "nsa/a1")
    # Pods whose records are known are unaffected.
    assert _allowed(early, "nsa/a1", "nsa/a2")


def test_missing_namespace_record_isolates_its_pods_only_when_labels_are_read() -> None:
    nsc_gone = snapshot(FROM_TEAM_X)
    nsc_gone = replace(nsc_gone, namespaces={k: v for k, v in nsc_gone.namespaces.items() if k != "nsc"})
    # nsc carries team=x; without its record nsc/c1 can be neither judged as a peer nor as a pod: no traffic.
    assert not _allowed(nsc_gone, "nsc/c1", "nsb/b1")
    assert not _allowed(nsc_gone, "nsa/a1", "nsc/c1")
    c = compile_policies(nsc_gone)
    assert (
        "namespace record not yet known"
        in explain(c, resolve_side(c, "nsa/a1"), resolve_side(c, "nsc/c1"), "TCP", 80).reason
    )
    with_record = snapshot(FROM_TEAM_X)
    assert _allowed(with_record, "nsc/c1", "nsb/b1")
    assert _allowed(with_record, "nsa/a1", "nsc/c1")
    # No policy reads namespace labels: a missing namespace record changes nothing.
    plain = snapshot(DENY_WEB)
    plain = replace(plain, namespaces={k: v for k, v in plain.namespaces.items() if k != "nsc"})
    assert _allowed(plain, "nsa/a1", "nsc/c1")


def test_unreadable_policy_isolates_its_namespace_both_ways() -> None:
    allow_clients = policy(
        "nsa", "allow-clients", {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]}
    )
    snap = replace(snapshot(allow_clients), broken_policies={("nsa", "deny-all"): "not valid JSON: truncated"})
    # nsa's valid policy still allows ingress from every namespace ...
    assert _allowed(snap, "nsb/b1", "nsa/a1")
    # ... but egress of nsa pods is isolated by the unreadable key (it may have been an egress deny).
    assert not _allowed(snap, "nsa/a1", "nsb/b1")
    # Alone, it isolates every pod of nsa both ways and nothing else.
    alone = replace(snapshot(), broken_policies={("nsa", "deny-all"): "not valid JSON: truncated"})
    assert not _allowed(alone, "nsb/b1", "nsa/a2")
    assert not _allowed(alone, "nsa/a2", "nsb/b1")
    assert _allowed(alone, "nsb/b1", "default/d1")
    result = compile_node(alone, "node1")
    status = result.statuses[("nsa", "deny-all")]
    assert not status.accepted
    assert "cannot be read" in status.reason and "truncated" in status.reason
    # Mended: the key's real policy applies (here: nothing isolates nsa any more).
    assert _allowed(snapshot(), "nsa/a2", "nsb/b1")
