"""Invalid policies are reported with the field at fault, skipped, and fail closed for the pods they select."""

from __future__ import annotations

from typing import Any

import pytest

from agent.calc.policy import compile_node, compile_policies
from agent.calc.policy.explain import explain, resolve_side
from tests.unit.policy_world import policy, snapshot

NSB_ONLY = {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"app": "nsb"}}}]}]}

INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("bad CIDR", {"ingress": [{"from": [{"ipBlock": {"cidr": "198.51.100.0/33"}}]}]}, "is not a valid CIDR"),
    ("not a CIDR", {"ingress": [{"from": [{"ipBlock": {"cidr": "banana"}}]}]}, "spec.ingress[0].from[0].ipBlock.cidr"),
    (
        "except outside cidr",
        {"ingress": [{"from": [{"ipBlock": {"cidr": "198.51.100.0/24", "except": ["203.0.113.0/25"]}}]}]},
        "not strictly inside cidr",
    ),
    (
        "except equal to cidr",
        {"ingress": [{"from": [{"ipBlock": {"cidr": "198.51.100.0/24", "except": ["198.51.100.0/24"]}}]}]},
        "not strictly inside cidr",
    ),
    ("port above range", {"ingress": [{"ports": [{"port": 70000}]}]}, "spec.ingress[0].ports[0].port: 70000"),
    ("port zero", {"egress": [{"ports": [{"port": 0}]}]}, "outside 1-65535"),
    ("unknown protocol", {"ingress": [{"ports": [{"protocol": "ICMP", "port": 1}]}]}, "'ICMP' is not one of"),
    ("lower-case protocol", {"ingress": [{"ports": [{"protocol": "tcp", "port": 80}]}]}, "'tcp' is not one of"),
    ("endPort below port", {"ingress": [{"ports": [{"port": 90, "endPort": 80}]}]}, "endPort: 80 must lie"),
    ("endPort with named port", {"ingress": [{"ports": [{"port": "http", "endPort": 90}]}]}, "named port"),
    ("bad port name", {"ingress": [{"ports": [{"port": "Not_A_Name"}]}]}, "not a valid port name"),
    ("numeric string port", {"ingress": [{"ports": [{"port": "80"}]}]}, "not a valid port name"),
    (
        "bad selector operator",
        {"ingress": [{"from": [{"podSelector": {"matchExpressions": [{"key": "a", "operator": "Equals"}]}}]}]},
        "operator: 'Equals'",
    ),
    (
        "In without values",
        {"ingress": [{"from": [{"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}]}]},
        "must be non-empty",
    ),
    (
        "ipBlock with a selector",
        {"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]},
        "may not be combined",
    ),
    ("empty peer", {"ingress": [{"from": [{}]}]}, "must specify"),
    ("bad policyType", {"policyTypes": ["Sideways"]}, "policyTypes[0]"),
    ("misspelt field", {"ingress": [{"form": [{"podSelector": {}}]}]}, "unknown field(s) form"),
]


@pytest.mark.parametrize(("spec", "reason"), [(s, r) for _, s, r in INVALID], ids=[i[0] for i in INVALID])
def test_invalid_policy_is_reported_and_skipped(spec: dict[str, Any], reason: str) -> None:
    good = policy("nsb", "good", NSB_ONLY)
    bad = policy("nsa", "bad", {"podSelector": {}, **spec})
    result = compile_node(snapshot(good, bad), "node1")
    assert result.statuses[("nsb", "good")].accepted
    status = result.statuses[("nsa", "bad")]
    assert not status.accepted
    assert reason in status.reason
    assert [s.name for s in result.rejected] == ["bad"]
    # the good policy still works: nsb isolated except from nsb
    c = result.compiled
    assert explain(c, resolve_side(c, "nsb/b2"), resolve_side(c, "nsb/b1"), "TCP", 80).allowed
    assert not explain(c, resolve_side(c, "default/d1"), resolve_side(c, "nsb/b1"), "TCP", 80).allowed


def _allowed(snap_policies: list[Any], src: str, dst: str, port: int = 80) -> bool:
    c = compile_policies(snapshot(*snap_policies))
    return explain(c, resolve_side(c, src), resolve_side(c, dst), "TCP", port).allowed


def test_broken_policy_fails_closed_for_the_pods_it_selects() -> None:
    # The broken policy would have allowed default/d1 into app=web pods; a correct policy allows only nsb.
    correct = policy("nsa", "correct", NSB_ONLY)
    broken = policy(
        "nsa",
        "broken",
        {
            "podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [
                {"from": [{"namespaceSelector": {}}], "ports": [{"port": 99999}]},
            ],
        },
    )
    assert _allowed([correct, broken], "nsb/b1", "nsa/a1")
    assert not _allowed([correct, broken], "default/d1", "nsa/a1")
    # Alone, the broken policy isolates the pods it selects and nothing else.
    assert not _allowed([broken], "nsb/b1", "nsa/a1")
    assert _allowed([broken], "nsb/b1", "nsa/a2")
    # Its egress is untouched: it declared only Ingress.
    assert _allowed([broken], "nsa/a1", "nsb/b1")


def test_broken_egress_policy_isolates_egress() -> None:
    broken = policy("nsa", "broken", {"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "x"}}]}]})
    assert not _allowed([broken], "nsa/a1", "nsb/b1")
    assert not _allowed([broken], "nsb/b1", "nsa/a1")  # defaulting: egress rules present → Ingress and Egress


def test_unreadable_pod_selector_isolates_the_whole_namespace() -> None:
    broken = policy(
        "nsa",
        "broken",
        {"podSelector": {"matchExpressions": [{"key": "app", "operator": "Bogus"}]}, "policyTypes": ["Ingress"]},
    )
    assert not _allowed([broken], "nsb/b1", "nsa/a1")
    assert not _allowed([broken], "nsb/b1", "nsa/a2")
    assert _allowed([broken], "nsa/a1", "nsb/b1")


def test_explain_names_the_rejected_policy() -> None:
    broken = policy("nsa", "broken", {"podSelector": {}, "ingress": [{"ports": [{"port": 0}]}]})
    c = compile_policies(snapshot(broken))
    v = explain(c, resolve_side(c, "nsb/b1"), resolve_side(c, "nsa/a1"), "TCP", 80)
    assert not v.allowed
    assert "rejected, allowing nothing: nsa/broken" in v.reason
