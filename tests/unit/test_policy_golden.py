"""Golden text: representative policies compiled for node1 and rendered by the dataplane's own renderer into the
exact ``ipset restore`` and ``iptables-restore`` input a first sync writes. The test only compares: after an
intended change, regenerate the files with ``scripts/update-golden`` (a separate command that no test run and no CI
step calls) and review the diff."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from agent.calc.policy import compile_node
from agent.calc.state import DataplaneState
from agent.dataplane.render import check_names, plan_ipsets, plan_table
from datastore import model as m
from tests.unit.policy_world import policy, snapshot

GOLDEN = Path(__file__).parent / "golden"

NSB = {"namespaceSelector": {"matchLabels": {"app": "nsb"}}}
POLICIES: dict[str, list[tuple[str, str, dict[str, Any]]]] = {
    "no_policy": [],
    "seed3_namespace_port": [
        (
            "nsa",
            "npa",
            {
                "podSelector": {},
                "policyTypes": ["Ingress"],
                "ingress": [{"from": [NSB], "ports": [{"protocol": "TCP", "port": 6379}]}],
            },
        ),
    ],
    "seed4_egress_cidr": [
        (
            "nsa",
            "npa",
            {
                "podSelector": {},
                "policyTypes": ["Egress"],
                "egress": [{"to": [{"ipBlock": {"cidr": "198.51.100.0/24"}}], "ports": [{"port": 5978}]}],
            },
        ),
    ],
    "named_ports_ranges_except": [
        (
            "nsa",
            "web",
            {
                "podSelector": {"matchLabels": {"app": "web"}},
                "ingress": [
                    {
                        "from": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.244.0.0/16"]}}],
                        "ports": [{"port": "http"}],
                    },
                    {
                        "from": [{**NSB, "podSelector": {"matchExpressions": [{"key": "tier", "operator": "Exists"}]}}],
                        "ports": [{"port": 8000, "endPort": 8100}, {"protocol": "UDP", "port": "dns"}],
                    },
                ],
            },
        ),
    ],
    "rejected_fails_closed": [
        ("nsa", "broken", {"podSelector": {"matchLabels": {"app": "db"}}, "ingress": [{"ports": [{"port": 0}]}]}),
    ],
}


def render(state: DataplaneState) -> str:
    check_names(state.tables, state.ipsets)
    sets = plan_ipsets(state.ipsets, {}, delete_stale=False).text
    tables = "".join(
        plan_table(
            t,
            desired=chains,
            jumps=state.jumps,
            current_chains={},
            builtin={c: [] for c in ("INPUT", "FORWARD", "OUTPUT")},
            delete_stale=False,
        ).text
        for t, chains in sorted(state.tables.items())
    )
    return f"# ipset restore\n{sets}# iptables-restore\n{tables}"


def golden_path(case: str) -> Path:
    return GOLDEN / f"policy_{case}.txt"


def expected(case: str) -> str:
    """What the compiler and renderer give for ``case`` today (what ``scripts/update-golden`` writes)."""
    snap = snapshot(*(policy(ns, name, spec) for ns, name, spec in POLICIES[case]))
    return render(compile_node(snap, "node1").state)


@pytest.mark.parametrize("case", sorted(POLICIES))
def test_golden(case: str) -> None:
    assert expected(case) == golden_path(case).read_text(), "intended? regenerate with scripts/update-golden"


def test_a_test_run_never_rewrites_the_golden_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Whatever the environment says (tox passes PODNET_* variables through), a mismatch fails and the file stays."""
    monkeypatch.setenv("PODNET_UPDATE_GOLDEN", "1")
    monkeypatch.setattr(sys.modules[__name__], "GOLDEN", tmp_path)
    stale = golden_path("no_policy")
    stale.write_text("stale\n")
    with pytest.raises(AssertionError):
        test_golden("no_policy")
    assert stale.read_text() == "stale\n"


def test_many_endpoints_dispatch_as_a_tree() -> None:
    """With 2 000 local endpoints no dispatch chain holds more than 17 rules (16 + unknown → DROP), and every
    endpoint is reachable from the root in a few hops."""
    pods = {f"nsa/p{i}": ({"app": "x"}, f"10.244.{i // 250}.{i % 250 + 2}", "node1", ()) for i in range(2000)}
    state = compile_node(snapshot(pods=pods), "node1").state
    chains = state.tables["filter"]
    check_names(state.tables, state.ipsets)
    tree = {n: c for n, c in chains.items() if n.startswith(("podnet-fp-", "podnet-from-pod"))}
    assert max(len(c.rules) for c in tree.values()) <= 17
    leaves = [r for c in tree.values() for r in c.rules if "-g podnet-fw-" in r]
    assert len(leaves) == 2000

    def depth(name: str, iface: str) -> int:
        for rule in chains[name].rules:
            parts = rule.split()
            if parts[:2] == ["-i", iface]:
                return 1
            if parts[0] == "-i" and parts[1].endswith("+") and iface.startswith(parts[1][:-1]):
                return 1 + depth(parts[3], iface)
        raise AssertionError(f"{iface} not dispatched from {name}")

    ifaces = sorted(r.split()[1] for r in leaves)
    assert max(depth("podnet-from-pod", i) for i in ifaces) <= 4
    assert chains["podnet-from-pod"].rules[-1].endswith("-j DROP")


def test_only_what_local_endpoints_need() -> None:
    # A policy selecting only nsb/b1 (on node2) gives node1 no policy chain and no ipset.
    snap = snapshot(policy("nsb", "p", {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"from": [NSB]}]}))
    n1 = compile_node(snap, "node1").state
    n2 = compile_node(snap, "node2").state
    assert not n1.ipsets and not any(n.startswith("podnet-pi-") for n in n1.tables["filter"])
    assert len(n2.ipsets) == 1 and sum(n.startswith("podnet-pi-") for n in n2.tables["filter"]) == 1
    (members,) = [s.members for s in n2.ipsets.values()]
    assert members == {"10.244.2.10", "10.244.1.12"}


def test_same_snapshot_same_state() -> None:
    cases = [x for case in POLICIES.values() for x in case]
    specs = [policy(ns, f"{name}{i}", spec) for i, (ns, name, spec) in enumerate(cases)]
    a = compile_node(snapshot(*specs), "node1").state
    b = compile_node(snapshot(*reversed(specs)), "node1").state
    assert render(a) == render(b)


def test_endpoint_with_foreign_interface_name_is_not_dispatched() -> None:
    snap = snapshot()
    ep = m.Endpoint("node1", "nsa", "odd", "eth0", "veth-odd", ("10.244.1.99/32",))
    snap.endpoints[("node1", "nsa", "odd", "eth0")] = ep
    chains = compile_node(snap, "node1").state.tables["filter"]
    assert not any("veth-odd" in r for c in chains.values() for r in c.rules)
