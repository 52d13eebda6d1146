"""The lab's pure parts: scenario validation (a bad file fails before anything starts, saying where) and the
matrix report (disagreements between kernel and compiler are marked)."""

from __future__ import annotations

import pytest

from lab.report import expected_from_json, mismatches, render
from lab.scenario import ScenarioError, load, parse

GOOD = """
nodes: [n1, n2]
pods:
  - {name: nsa/a1, node: n1, labels: {app: a}}
  - {name: default/d1, node: n2}
phases:
  - name: open
  - name: locked
    apply: "kind: NetworkPolicy"
    ports: [80/tcp, 53/UDP]
  - name: gone
    delete: [nsa/npa]
"""


def test_a_scenario_parses_with_defaults() -> None:
    sc = parse(GOOD)
    assert sc.nodes == ("n1", "n2") and sc.encapsulation == "vxlan"
    assert [p.key for p in sc.pods] == ["nsa/a1", "default/d1"]
    assert sc.namespaces == {"nsa": {}, "default": {}}
    assert [p.ports for p in sc.phases] == [((80, "TCP"),), ((80, "TCP"), (53, "UDP")), ((80, "TCP"),)]
    assert sc.phases[2].delete == ("nsa/npa",)
    assert sc.ports() == [(53, "UDP"), (80, "TCP")]
    assert parse(GOOD, encapsulation="none").encapsulation == "none"


def test_the_shipped_seed_scenario_is_valid() -> None:
    sc = load(None)
    assert len(sc.nodes) == 3 and len(sc.pods) == 6 and len(sc.phases) == 8 and sc.outside == "198.51.100.7"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("- just a list", "a mapping"),
        ("nodes: []\npods: []", "nodes:"),
        ("nodes: [N_1]\npods: []", "nodes:"),
        ("nodes: [n1]\npods: []", "at least one pod"),
        ("nodes: [n1]\npods: [{name: a1, node: n1}]", "NAMESPACE/POD"),
        ("nodes: [n1]\npods: [{name: x/a1, node: n2}]", "node 'n2' is not one of"),
        ("nodes: [n1]\npods: [{name: x/a, node: n1}, {name: x/a, node: n1}]", "twice"),
        ("nodes: [n1]\npods: [{name: x/a, node: n1}]\nphases: [{name: p, ports: [70000/TCP]}]", "port"),
        ("nodes: [n1]\npods: [{name: x/a, node: n1}]\nphases: [{name: p, ports: [80/ICMP]}]", "port"),
        ("nodes: [n1]\nencapsulation: ipip\npods: [{name: x/a, node: n1}]", "no IPIP"),
        ("nodes: [n1]\npods: [{name: x/a, node: n1, labels: {k: 1}}]", "mapping of strings"),
        ("nodes: [n1\n", "not YAML"),
        ("nodes: [n1]\noutside: 8.8.8.8\npods: [{name: x/a, node: n1}]", "must be a host in"),
        ("nodes: [n1]\noutside: 198.51.100.1\npods: [{name: x/a, node: n1}]", "must be a host in"),
        ("nodes: [n1]\noutside: nowhere\npods: [{name: x/a, node: n1}]", "not an IPv4 address"),
    ],
)
def test_bad_scenarios_are_refused_with_the_reason(text: str, says: str) -> None:
    with pytest.raises(ScenarioError, match=None) as err:
        parse(text)
    assert says in str(err.value)


def test_the_report_marks_where_the_kernel_disagrees() -> None:
    doc = {"allowed": {"a/x": {"b/y": True}, "b/y": {"a/x": False}}}
    expected = expected_from_json(doc)
    assert expected == {("a/x", "b/y"): True, ("b/y", "a/x"): False}
    observed = {("a/x", "b/y"): True, ("b/y", "a/x"): True}
    assert mismatches(expected, observed) == [("b/y", "a/x")]
    assert mismatches(expected, {("a/x", "b/y"): True}) == [("b/y", "a/x")]  # a missing answer is a mismatch too
    lines = render(["a/x", "b/y"], expected, observed).splitlines()
    assert lines[1].split()[-2:] == ["·", "ok"]
    assert lines[2].split()[-2:] == ["ok!", "·"]
    with pytest.raises(ValueError, match="allowed"):
        expected_from_json({})
