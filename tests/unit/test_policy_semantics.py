"""NetworkPolicy semantics, table-driven through the compiler's own explain: every case checks at least one
connection that must be allowed and one that must be denied."""

from __future__ import annotations

from typing import Any

import pytest

from agent.calc.policy import compile_policies
from agent.calc.policy.explain import explain, matrix, parse_port, resolve_side
from tests.unit.policy_world import OUTSIDE, OUTSIDE_HIGH, policy, snapshot

ALL: dict[str, Any] = {}
NSB = {"namespaceSelector": {"matchLabels": {"app": "nsb"}}}
DENY_INGRESS = {"podSelector": {}, "policyTypes": ["Ingress"]}
DENY_EGRESS = {"podSelector": {}, "policyTypes": ["Egress"]}


def ing(*rules: dict[str, Any], sel: dict[str, Any] | None = None, types: list[str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"podSelector": sel or {}, "ingress": list(rules)}
    if types is not None:
        spec["policyTypes"] = types
    return spec


def egr(*rules: dict[str, Any], sel: dict[str, Any] | None = None, types: list[str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"podSelector": sel or {}, "egress": list(rules), "policyTypes": types or ["Egress"]}
    return spec


def labels(**kv: str) -> dict[str, Any]:
    return {"matchLabels": dict(kv)}


def expr(key: str, op: str, *values: str) -> dict[str, Any]:
    e: dict[str, Any] = {"key": key, "operator": op}
    if values:
        e["values"] = list(values)
    return {"matchExpressions": [e]}


# (case id, [(namespace, policy spec)], [(from, to, port, allowed)])
CASES: list[tuple[str, list[tuple[str, dict[str, Any]]], list[tuple[str, str, str, bool]]]] = [
    (
        "unselected pods are unrestricted",
        [("nsa", {"podSelector": labels(app="db"), "policyTypes": ["Ingress"]})],
        [("nsb/b1", "nsa/a1", "80", True), ("nsb/b1", "nsa/a2", "80", False)],
    ),
    (
        "deny all ingress isolates ingress only",
        [("nsa", DENY_INGRESS)],
        [("nsb/b1", "nsa/a1", "80", False), ("nsa/a2", "nsa/a1", "80", False), ("nsa/a1", "nsb/b1", "80", True)],
    ),
    (
        "seed 1: same namespace allowed, others not",
        [("nsa", ing({"from": [{"podSelector": {}}]}))],
        [("nsa/a2", "nsa/a1", "80", True), ("nsa/a3", "nsa/a1", "5000", True), ("nsb/b1", "nsa/a1", "80", False)],
    ),
    (
        "seed 3: namespace nsb only, only 6379/TCP",
        [("nsa", ing({"from": [NSB], "ports": [{"protocol": "TCP", "port": 6379}]}))],
        [
            ("nsb/b1", "nsa/a1", "6379", True),
            ("nsb/b2", "nsa/a2", "6379", True),
            ("nsb/b1", "nsa/a1", "80", False),
            ("nsb/b1", "nsa/a1", "6379/UDP", False),
            ("default/d1", "nsa/a1", "6379", False),
            ("nsa/a2", "nsa/a1", "6379", False),
        ],
    ),
    (
        "seed 4: egress only to an outside CIDR on 5978/TCP",
        [("nsa", egr({"to": [{"ipBlock": {"cidr": "198.51.100.0/24"}}], "ports": [{"port": 5978}]}))],
        [
            ("nsa/a1", OUTSIDE, "5978", True),
            ("nsa/a1", OUTSIDE, "80", False),
            ("nsa/a1", "nsb/b1", "5978", False),
            ("nsb/b1", "nsa/a1", "80", True),
        ],
    ),
    (
        "seed 5: default accepts only the outside CIDR on 80/TCP",
        [("default", ing({"from": [{"ipBlock": {"cidr": "198.51.100.0/24"}}], "ports": [{"port": 80}]}))],
        [
            (OUTSIDE, "default/d1", "80", True),
            (OUTSIDE, "default/d1", "81", False),
            ("nsb/b1", "default/d1", "80", False),
        ],
    ),
    (
        "ingress podSelector is namespace-local",
        [("nsb", ing({"from": [{"podSelector": labels(app="client")}]}, sel=labels(app="web")))],
        [("nsb/b2", "nsb/b1", "80", True), ("nsa/a3", "nsb/b1", "80", False)],
    ),
    (
        "matchExpressions In",
        [("nsa", ing({"from": [{"podSelector": expr("app", "In", "db", "client")}]}, sel=labels(app="web")))],
        [("nsa/a2", "nsa/a1", "80", True), ("nsa/a3", "nsa/a1", "80", True), ("nsb/b2", "nsa/a1", "80", False)],
    ),
    (
        "matchExpressions NotIn",
        [("nsa", ing({"from": [{"podSelector": expr("app", "NotIn", "db")}]}, sel=labels(app="web")))],
        [("nsa/a3", "nsa/a1", "80", True), ("nsa/a2", "nsa/a1", "80", False)],
    ),
    (
        "matchExpressions Exists (in any namespace)",
        [("nsa", ing({"from": [{"namespaceSelector": {}, "podSelector": expr("tier", "Exists")}]}))],
        [("nsb/b2", "nsa/a1", "80", True), ("nsc/c1", "nsa/a1", "80", True), ("nsb/b1", "nsa/a1", "80", False)],
    ),
    (
        "matchExpressions DoesNotExist selects the policy's pods",
        [("nsa", {"podSelector": expr("role", "DoesNotExist"), "policyTypes": ["Ingress"]})],
        [("nsb/b1", "nsa/a1", "80", True), ("nsb/b1", "nsa/a2", "80", False), ("nsb/b1", "nsa/a3", "80", False)],
    ),
    (
        "empty namespaceSelector: every pod of every namespace, no outside address",
        [("nsa", ing({"from": [{"namespaceSelector": {}}]}))],
        [("nsc/c1", "nsa/a1", "80", True), ("default/d1", "nsa/a1", "80", True), (OUTSIDE, "nsa/a1", "80", False)],
    ),
    (
        "podSelector AND namespaceSelector in one peer",
        [("nsa", ing({"from": [{**NSB, "podSelector": labels(app="client")}]}))],
        [("nsb/b2", "nsa/a1", "80", True), ("nsb/b1", "nsa/a1", "80", False), ("nsa/a3", "nsa/a1", "80", False)],
    ),
    (
        "separate peers are ORed",
        [("nsa", ing({"from": [NSB, {"podSelector": labels(app="db")}]}, sel=labels(app="web")))],
        [("nsb/b1", "nsa/a1", "80", True), ("nsa/a2", "nsa/a1", "80", True), ("default/d1", "nsa/a1", "80", False)],
    ),
    (
        "namespace selected by its name label",
        [("nsa", ing({"from": [{"namespaceSelector": labels(**{"kubernetes.io/metadata.name": "default"})}]}))],
        [("default/d1", "nsa/a1", "80", True), ("nsb/b1", "nsa/a1", "80", False)],
    ),
    (
        "ipBlock with except",
        [("nsa", ing({"from": [{"ipBlock": {"cidr": "198.51.100.0/24", "except": ["198.51.100.128/25"]}}]}))],
        [(OUTSIDE, "nsa/a1", "80", True), (OUTSIDE_HIGH, "nsa/a1", "80", False)],
    ),
    (
        "ipBlock 0.0.0.0/0 with except",
        [("nsa", ing({"from": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.244.0.0/16"]}}]}))],
        [(OUTSIDE, "nsa/a1", "80", True), ("192.0.2.1", "nsa/a1", "80", True), ("nsb/b1", "nsa/a1", "80", False)],
    ),
    (
        "ipBlock may match pod addresses",
        [("nsa", ing({"from": [{"ipBlock": {"cidr": "10.244.2.0/24"}}]}))],
        [("nsb/b1", "nsa/a1", "80", True), ("nsb/b2", "nsa/a1", "80", False)],
    ),
    (
        "port by number",
        [("nsa", ing({"ports": [{"port": 80}]}))],
        [("nsb/b1", "nsa/a1", "80", True), ("nsb/b1", "nsa/a1", "81", False)],
    ),
    (
        "UDP port",
        [("nsa", ing({"ports": [{"protocol": "UDP", "port": 53}]}))],
        [("nsb/b1", "nsa/a1", "53/UDP", True), ("nsb/b1", "nsa/a1", "53/TCP", False)],
    ),
    (
        "protocol defaults to TCP",
        [("nsa", ing({"ports": [{"port": 53}]}))],
        [("nsb/b1", "nsa/a1", "53/TCP", True), ("nsb/b1", "nsa/a1", "53/UDP", False)],
    ),
    (
        "SCTP port",
        [("nsa", ing({"ports": [{"protocol": "SCTP", "port": 9000}]}))],
        [
            ("nsb/b1", "nsa/a1", "9000/SCTP", True),
            ("nsb/b1", "nsa/a1", "9000/TCP", False),
            ("nsa/a1", "nsb/b1", "9000/TCP", True),
        ],
    ),
    (
        "protocol without port: every port of that protocol",
        [("nsa", ing({"ports": [{"protocol": "UDP"}]}))],
        [("nsb/b1", "nsa/a1", "5353/UDP", True), ("nsb/b1", "nsa/a1", "5353/TCP", False)],
    ),
    (
        "endPort range",
        [("nsa", ing({"ports": [{"port": 8000, "endPort": 8100}]}))],
        [
            ("nsb/b1", "nsa/a1", "8000", True),
            ("nsb/b1", "nsa/a1", "8100", True),
            ("nsb/b1", "nsa/a1", "7999", False),
            ("nsb/b1", "nsa/a1", "8101", False),
        ],
    ),
    (
        "several ports in one rule are ORed",
        [("nsa", ing({"ports": [{"port": 80}, {"port": 443}]}))],
        [("nsb/b1", "nsa/a1", "443", True), ("nsb/b1", "nsa/a1", "80", True), ("nsb/b1", "nsa/a1", "8443", False)],
    ),
    (
        "named port resolved per destination pod",
        [("nsa", ing({"ports": [{"port": "http"}]}))],
        [
            ("nsb/b1", "nsa/a1", "8080", True),
            ("nsb/b1", "nsa/a2", "9090", True),
            ("nsb/b1", "nsa/a1", "9090", False),
            ("nsb/b1", "nsa/a2", "8080", False),
            ("nsb/b1", "nsa/a3", "8080", False),
        ],
    ),
    (
        "named port that no pod has matches nothing",
        [("nsa", ing({"ports": [{"port": "metrics"}]}, sel=labels(app="web")))],
        [("nsb/b1", "nsa/a1", "8080", False), ("nsb/b1", "nsa/a1", "9100", False), ("nsb/b1", "nsa/a2", "80", True)],
    ),
    (
        "named port must match the protocol too",
        [("nsa", ing({"ports": [{"port": "dns", "protocol": "UDP"}, {"port": "http", "protocol": "UDP"}]}))],
        [
            ("nsb/b1", "nsa/a1", "53/UDP", True),
            ("nsb/b1", "nsa/a1", "53/TCP", False),
            ("nsb/b1", "nsa/a1", "8080/UDP", False),
        ],
    ),
    (
        "named port in egress is the destination's",
        [("nsa", egr({"ports": [{"port": "http"}]}, sel=labels(app="web")))],
        [("nsa/a1", "nsa/a2", "9090", True), ("nsa/a1", "nsa/a2", "8080", False), ("nsa/a1", OUTSIDE, "9090", False)],
    ),
    (
        "policyTypes default adds Egress when egress rules exist (and isolates ingress)",
        [("nsa", {"podSelector": {}, "egress": [{"ports": [{"port": 5978}]}]})],
        [("nsa/a1", "nsb/b1", "5978", True), ("nsa/a1", "nsb/b1", "80", False), ("nsb/b1", "nsa/a1", "80", False)],
    ),
    (
        "policyTypes [Egress] leaves ingress open",
        [("nsa", egr({"to": [NSB]}))],
        [("nsb/b1", "nsa/a1", "80", True), ("nsa/a1", "nsb/b1", "80", True), ("nsa/a1", "default/d1", "80", False)],
    ),
    (
        "egress rules are ignored when policyTypes is [Ingress]",
        [
            (
                "nsa",
                {
                    "podSelector": {},
                    "policyTypes": ["Ingress"],
                    "ingress": [{"from": [NSB]}],
                    "egress": [{"to": [NSB]}],
                },
            )
        ],
        [("nsa/a1", "default/d1", "80", True), ("nsb/b1", "nsa/a1", "80", True), ("default/d1", "nsa/a1", "80", False)],
    ),
    (
        "deny all egress",
        [("nsa", DENY_EGRESS)],
        [("nsa/a1", "nsb/b1", "80", False), ("nsa/a1", OUTSIDE, "53/UDP", False), ("nsb/b1", "nsa/a1", "80", True)],
    ),
    (
        "empty ingress rule allows everything; a rule with only ports allows every source",
        [("nsa", ing({}, sel=labels(app="web"))), ("nsa", ing({"ports": [{"port": 80}]}, sel=labels(app="db")))],
        [
            (OUTSIDE, "nsa/a1", "12345", True),
            ("nsb/b1", "nsa/a2", "80", True),
            (OUTSIDE, "nsa/a2", "80", True),
            ("nsb/b1", "nsa/a2", "81", False),
        ],
    ),
    (
        "several policies on one pod are a union",
        [
            ("nsa", ing({"from": [NSB]}, sel=labels(app="web"))),
            ("nsa", ing({"from": [{"namespaceSelector": labels(team="x")}]}, sel=labels(app="web"))),
        ],
        [("nsb/b1", "nsa/a1", "80", True), ("nsc/c1", "nsa/a1", "80", True), ("default/d1", "nsa/a1", "80", False)],
    ),
    (
        "source egress AND destination ingress",
        [
            ("nsb", egr({"to": [{"namespaceSelector": labels(app="nsa")}]})),
            ("nsa", ing({"from": [{"podSelector": labels(app="client"), "namespaceSelector": {}}]})),
        ],
        [
            ("nsb/b2", "nsa/a1", "80", True),
            ("nsb/b1", "nsa/a1", "80", False),  # egress allows, ingress does not
            ("nsb/b2", "default/d1", "80", False),  # ingress open, egress does not allow
            ("nsa/a3", "nsa/a1", "80", True),
        ],
    ),
    (
        "same-node and cross-node pods are treated alike",
        [("nsa", ing({"from": [NSB]}))],
        [("nsb/b2", "nsa/a1", "80", True), ("nsb/b1", "nsa/a1", "80", True), ("nsc/c1", "nsa/a2", "80", False)],
    ),
    (
        "traffic from the pod's own node is always allowed",
        [("nsa", DENY_INGRESS)],
        [
            ("192.168.77.11", "nsa/a1", "80", True),
            ("192.168.77.12", "nsa/a1", "80", False),
            ("192.168.77.12", "nsa/a3", "80", True),
        ],
    ),
    (
        "traffic to the pod's own node is always allowed",
        [("nsa", DENY_EGRESS)],
        [
            ("nsa/a1", "192.168.77.11", "80", True),
            ("nsa/a1", "192.168.77.12", "80", False),
            ("nsa/a3", "192.168.77.12", "80", True),
        ],
    ),
    (
        "a policy selects only pods of its own namespace",
        [("nsb", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})],
        [("nsa/a1", "nsa/a2", "80", True), ("nsa/a1", "nsb/b1", "80", False), ("nsb/b1", "nsa/a1", "80", False)],
    ),
    (
        "egress peers by pod selector do not match outside addresses",
        [("nsa", egr({"to": [{"podSelector": {}}]}))],
        [("nsa/a1", "nsa/a2", "443", True), ("nsa/a1", OUTSIDE, "443", False)],
    ),
]


def _check(policies: list[tuple[str, dict[str, Any]]], src: str, dst: str, port: str) -> bool:
    snap = snapshot(*(policy(ns, f"p{i}", spec) for i, (ns, spec) in enumerate(policies)))
    c = compile_policies(snap)
    assert all(s.accepted for s in c.statuses.values()), c.statuses
    number, proto = parse_port(port)
    return explain(c, resolve_side(c, src), resolve_side(c, dst), proto, number).allowed


@pytest.mark.parametrize(("policies", "checks"), [(p, c) for _, p, c in CASES], ids=[c[0] for c in CASES])
def test_semantics(policies: list[tuple[str, dict[str, Any]]], checks: list[tuple[str, str, str, bool]]) -> None:
    got = [(src, dst, port, _check(policies, src, dst, port)) for src, dst, port, _ in checks]
    assert got == checks


def test_every_case_checks_allowed_and_denied() -> None:
    assert len(CASES) >= 30
    for name, _, checks in CASES:
        assert {c[3] for c in checks} == {True, False}, name


def test_pod_to_itself_is_allowed_even_when_isolated() -> None:
    c = compile_policies(snapshot(policy("nsa", "deny", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})))
    v = explain(c, resolve_side(c, "nsa/a1"), resolve_side(c, "nsa/a1"), "TCP", 80)
    assert v.allowed and "itself" in v.reason
    assert not explain(c, resolve_side(c, "nsa/a1"), resolve_side(c, "nsa/a2"), "TCP", 80).allowed


def test_matrix_agrees_with_explain() -> None:
    snap = snapshot(policy("nsa", "npa", ing({"from": [{"podSelector": {}}]})))
    c = compile_policies(snap)
    mx = matrix(c, "TCP", 80)
    assert len(mx.pods) == 7
    assert mx.allowed[(("nsa", "a2"), ("nsa", "a1"))] is True
    assert mx.allowed[(("nsb", "b1"), ("nsa", "a1"))] is False
    assert mx.allowed[(("nsa", "a1"), ("nsb", "b1"))] is True
    denied = sorted((s, d) for (s, d), ok in mx.allowed.items() if not ok)
    # every pod outside nsa (4) to each of nsa's 3 pods
    assert len(denied) == 12 and all(d[0] == "nsa" and s[0] != "nsa" for s, d in denied)


def test_matrix_with_an_outside_host_both_ways() -> None:
    egress_cidr = {
        "podSelector": {},
        "policyTypes": ["Egress"],
        "egress": [{"to": [{"ipBlock": {"cidr": "198.51.100.0/24"}}], "ports": [{"port": 5978}]}],
    }
    c = compile_policies(snapshot(policy("nsa", "out", egress_cidr)))
    outside = "198.51.100.7"
    on_port = matrix(c, "TCP", 5978, hosts=(outside,))
    off_port = matrix(c, "TCP", 80, hosts=(outside,))
    assert on_port.reaches("nsa/a1", outside) is True and off_port.reaches("nsa/a1", outside) is False
    assert off_port.reaches("nsb/b1", outside) is True  # nsb has no egress policy
    assert off_port.reaches(outside, "nsa/a1") is True  # egress policies do not isolate ingress
    assert off_port.reaches(outside, outside) is None and off_port.reaches("nsa/a1", "nsa/a1") is None
    doc = off_port.to_json()
    assert doc["hosts"] == [outside]
    allowed = doc["allowed"]
    assert isinstance(allowed, dict)
    assert allowed[outside]["nsa/a1"] is True and allowed["nsa/a1"][outside] is False
    assert allowed["nsa/a1"]["nsa/a2"] is False  # egress isolation covers pods too
