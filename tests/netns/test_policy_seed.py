"""The seed document's five example policies and its six-row functional table, in the real kernel: two node
namespaces, pods in nsa, nsb and default on both, an outside host standing in for 14.215.0.0/16 (here
198.51.100.0/24), each policy applied from its extensions/v1beta1 YAML through `agentctl apply`'s parser, compiled
for each node and programmed by the dataplane writer; probed with real TCP and UDP, allowed and denied, same-node
and cross-node (row 6 of the table is every row below with source and destination on one node)."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator

import pytest

from agent.ctl.manifest import parse_manifests
from datastore import model as m
from testbed.netns import NetnsBed
from tests.conftest import SESSION_ID
from tests.netns.policy_bed import Cluster, build, mismatches

pytestmark = pytest.mark.netns

PODS = {
    "nsa/a1": ("node1", "10.244.1.10", {"app": "a"}),
    "nsb/b1": ("node1", "10.244.1.20", {"app": "b"}),
    "default/d1": ("node1", "10.244.1.30", {"app": "d"}),
    "nsa/a2": ("node2", "10.244.2.10", {"app": "a"}),
    "nsb/b2": ("node2", "10.244.2.20", {"app": "b"}),
    "default/d2": ("node2", "10.244.2.30", {"app": "d"}),
}
NS_LABELS = {"nsa": {"app": "nsa"}, "nsb": {"app": "nsb"}, "default": {}}

HEAD = "apiVersion: extensions/v1beta1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n"
SEED = {
    1: ("nsa", "npa", "ingress:\n- from:\n  - podSelector: {}\npodSelector: {}\npolicyTypes:\n- Ingress\n"),
    2: ("nsa", "npa", "podSelector: {}\npolicyTypes:\n- Ingress\n"),
    3: (
        "nsa",
        "npa",
        "ingress:\n- from:\n  - namespaceSelector:\n      matchLabels:\n        app: nsb\n  ports:\n  - protocol: TCP\n"
        "    port: 6379\npodSelector: {}\npolicyTypes:\n- Ingress\n",
    ),
    4: (
        "nsa",
        "npa",
        "egress:\n- to:\n  - ipBlock:\n      cidr: 198.51.100.0/16\n  ports:\n  - protocol: TCP\n    port: 5978\n"
        "podSelector: {}\npolicyTypes:\n- Egress\n",
    ),
    5: (
        "default",
        "npd",
        "ingress:\n- from:\n  - ipBlock:\n      cidr: 198.51.100.0/24\n  ports:\n  - protocol: TCP\n    port: 80\n"
        "podSelector: {}\npolicyTypes:\n- Ingress\n",
    ),
}
# Row 3 of the table: namespace B whitelisted into A (every port): seed 3 without its port restriction.
WHITELIST_NSB = (
    "nsa",
    "npa",
    "ingress:\n- from:\n  - namespaceSelector:\n      matchLabels:\n        app: nsb\npodSelector: {}\n",
)


def seed_policy(ns: str, name: str, spec: str) -> m.Policy:
    text = HEAD.format(name=name, ns=ns) + textwrap.indent(spec, "  ")
    text = text.replace("198.51.100.0/16", "198.51.100.0/24")
    (obj,) = parse_manifests(text)
    assert isinstance(obj, m.Policy)
    return obj


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    bed = NetnsBed(run_id=f"{SESSION_ID}ps")
    try:
        yield build(
            bed,
            PODS,
            NS_LABELS,
            listen=[("tcp", 80), ("udp", 80), ("tcp", 6379), ("udp", 6379)],
            outside_listen=[("tcp", 5978), ("udp", 5978), ("tcp", 80)],
        )
    finally:
        bed.close()


T, F = True, False

# (row of the seed table, policies, [(from, to, proto, port, allowed)])
ROWS = [
    (
        "1: namespaces isolated, same namespace reaches itself",
        [SEED[1]],
        [
            ("nsa/a2", "nsa/a1", "tcp", 80, T),
            ("nsa/a1", "nsa/a2", "udp", 6379, T),
            ("nsb/b1", "nsa/a1", "tcp", 80, F),
            ("nsb/b1", "nsa/a1", "udp", 80, F),
            ("nsb/b2", "nsa/a1", "tcp", 6379, F),
            ("default/d2", "nsa/a2", "udp", 80, F),
            ("nsa/a1", "nsb/b1", "tcp", 80, T),
            ("nsa/a1", "default/d2", "udp", 80, T),
            ("node1", "nsa/a1", "tcp", 80, T),
            ("node2", "nsa/a1", "tcp", 80, F),
            ("outside", "nsa/a2", "tcp", 80, F),
        ],
    ),
    (
        "2: namespaces isolated, same namespace isolated too",
        [SEED[2]],
        [
            ("nsa/a2", "nsa/a1", "tcp", 80, F),
            ("nsa/a1", "nsa/a2", "udp", 6379, F),
            ("nsb/b1", "nsa/a1", "tcp", 80, F),
            ("nsa/a1", "nsb/b1", "tcp", 80, T),
            ("nsa/a2", "default/d1", "udp", 80, T),
            ("nsb/b1", "default/d1", "tcp", 6379, T),
            ("node2", "nsa/a2", "tcp", 80, T),
        ],
    ),
    (
        "3: namespaces isolated, namespace B whitelisted into A",
        [WHITELIST_NSB],
        [
            ("nsb/b1", "nsa/a1", "tcp", 80, T),
            ("nsb/b2", "nsa/a1", "udp", 6379, T),
            ("nsb/b1", "nsa/a2", "tcp", 6379, T),
            ("default/d1", "nsa/a1", "tcp", 80, F),
            ("default/d2", "nsa/a2", "udp", 80, F),
            ("nsa/a2", "nsa/a1", "tcp", 80, F),
            ("nsa/a1", "default/d1", "tcp", 80, T),
        ],
    ),
    (
        "4: a namespace reaches one outside CIDR on one port, nothing else",
        [SEED[4]],
        [
            ("nsa/a1", "outside", "tcp", 5978, T),
            ("nsa/a2", "outside", "tcp", 5978, T),
            ("nsa/a1", "outside", "tcp", 80, F),
            ("nsa/a1", "outside", "udp", 5978, F),
            ("nsa/a1", "nsb/b1", "tcp", 80, F),
            ("nsa/a1", "nsa/a2", "udp", 80, F),
            ("nsa/a2", "default/d2", "tcp", 6379, F),
            ("nsb/b1", "nsa/a1", "tcp", 80, T),
            ("nsb/b1", "outside", "tcp", 80, T),
            ("default/d2", "nsa/a2", "udp", 6379, T),
        ],
    ),
    (
        "5: namespace B reaches only one port of namespace A",
        [SEED[3]],
        [
            ("nsb/b1", "nsa/a1", "tcp", 6379, T),
            ("nsb/b2", "nsa/a1", "tcp", 6379, T),
            ("nsb/b1", "nsa/a2", "tcp", 6379, T),
            ("nsb/b1", "nsa/a1", "tcp", 80, F),
            ("nsb/b2", "nsa/a2", "udp", 6379, F),
            ("default/d1", "nsa/a1", "tcp", 6379, F),
            ("nsa/a2", "nsa/a1", "tcp", 6379, F),
            ("nsa/a1", "nsb/b2", "tcp", 80, T),
        ],
    ),
    (
        "seed 5: default accepts only the outside CIDR on 80/TCP",
        [SEED[5]],
        [
            ("outside", "default/d1", "tcp", 80, T),
            ("outside", "default/d2", "tcp", 80, T),
            ("outside", "default/d1", "tcp", 6379, F),
            ("nsa/a1", "default/d1", "tcp", 80, F),
            ("nsb/b2", "default/d1", "tcp", 80, F),
            ("default/d2", "default/d1", "udp", 80, F),
            ("node1", "default/d1", "tcp", 80, T),
            ("node2", "default/d1", "tcp", 80, F),
            ("default/d1", "nsa/a1", "tcp", 80, T),
            ("outside", "nsa/a1", "tcp", 80, T),
        ],
    ),
]


@pytest.mark.parametrize(("policies", "checks"), [(p, c) for _, p, c in ROWS], ids=[r[0] for r in ROWS])
def test_seed_row(
    cluster: Cluster, policies: list[tuple[str, str, str]], checks: list[tuple[str, str, str, int, bool]]
) -> None:
    assert {c[4] for c in checks} == {True, False}
    cluster.program([seed_policy(*p) for p in policies])
    assert mismatches(cluster, checks) == []


def test_no_policy_everything_reaches_everything(cluster: Cluster) -> None:
    cluster.program([])
    checks = [
        ("nsb/b1", "nsa/a1", "tcp", 80, T),
        ("nsa/a2", "default/d1", "udp", 6379, T),
        ("outside", "default/d2", "tcp", 80, T),
        ("nsa/a1", "outside", "udp", 5978, T),
        # a port nobody listens on: a probe that can fail
        ("nsa/a1", "nsb/b1", "tcp", 81, F),
    ]
    assert mismatches(cluster, checks) == []
