"""The host paths of the compiled filter table in the real kernel: a pod and its own node always reach each other
(INPUT / OUTPUT), other nodes go through policy (FORWARD), a cali interface the datastore does not know is dropped
both ways, and exactly one podnet jump sits first in FORWARD, INPUT and OUTPUT."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from datastore import model as m
from testbed.netns import NetnsBed
from tests.conftest import SESSION_ID
from tests.netns.policy_bed import Cluster, build, listen_many, mismatches

pytestmark = pytest.mark.netns

PODS = {
    "nsa/a1": ("node1", "10.244.1.10", {"app": "a"}),
    "nsa/a2": ("node1", "10.244.1.11", {"app": "a"}),
    "nsb/b1": ("node1", "10.244.1.20", {"app": "b"}),
    "nsb/ghost": ("node1", "10.244.1.99", {"app": "ghost"}),  # wired, but no endpoint in the datastore
}
PORT = 9000
DENY_EGRESS = {"podSelector": {}, "policyTypes": ["Egress"]}
DENY_INGRESS = {"podSelector": {}, "policyTypes": ["Ingress"]}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    bed = NetnsBed(run_id=f"{SESSION_ID}ph")
    try:
        c = build(bed, PODS, {"nsa": {}, "nsb": {}}, listen=[("tcp", PORT)], outside_listen=[("tcp", PORT)])
        for node in c.nodes.values():
            listen_many(node.ns, [("tcp", PORT)])
        yield c
    finally:
        bed.close()


def program(c: Cluster, *specs: tuple[str, dict[str, object]]) -> None:
    ghost = c.pods.pop("nsb/ghost")
    try:
        c.program([m.Policy(ns, f"p{i}", spec) for i, (ns, spec) in enumerate(specs)])
    finally:
        c.pods["nsb/ghost"] = ghost


def test_pod_reaches_its_own_node_despite_egress_isolation(cluster: Cluster) -> None:
    program(cluster, ("nsa", DENY_EGRESS))
    checks = [
        ("nsa/a1", "192.168.77.11", "tcp", PORT, True),  # own node: INPUT, always allowed
        ("nsa/a1", "192.168.77.12", "tcp", PORT, False),  # another node: FORWARD, egress isolated
        ("nsa/a1", "nsa/a2", "tcp", PORT, False),
        ("nsb/b1", "192.168.77.12", "tcp", PORT, True),
    ]
    assert mismatches(cluster, checks) == []


def test_own_node_reaches_isolated_pod_other_node_does_not(cluster: Cluster) -> None:
    program(cluster, ("nsa", DENY_INGRESS))
    checks = [
        ("node1", "nsa/a1", "tcp", PORT, True),  # OUTPUT: from the pod's own node
        ("node2", "nsa/a1", "tcp", PORT, False),  # arrives on eth0, FORWARD into cali: ingress isolated
        ("outside", "nsa/a2", "tcp", PORT, False),
        ("outside", "nsb/b1", "tcp", PORT, True),
    ]
    assert mismatches(cluster, checks) == []


def test_unknown_cali_interface_is_dropped(cluster: Cluster) -> None:
    program(cluster)  # no policy at all: every known pod is unrestricted
    checks = [
        ("nsa/a1", "nsb/b1", "tcp", PORT, True),
        ("nsb/ghost", "nsa/a1", "tcp", PORT, False),  # FORWARD from an unknown cali
        ("nsb/ghost", "192.168.77.11", "tcp", PORT, False),  # INPUT from an unknown cali
        ("nsa/a1", "nsb/ghost", "tcp", PORT, False),  # FORWARD to an unknown cali
        ("outside", "nsb/ghost", "tcp", PORT, False),
    ]
    assert mismatches(cluster, checks) == []


def test_one_jump_first_in_each_builtin_chain(cluster: Cluster) -> None:
    program(cluster, ("nsa", DENY_INGRESS))
    program(cluster, ("nsa", DENY_EGRESS))  # a second sync must not add jumps
    writer = cluster.writers["node1"]
    dump = cluster.nodes["node1"].ns.run(writer.backend.save).stdout
    for chain in ("FORWARD", "INPUT", "OUTPUT"):
        rules = [line for line in dump.splitlines() if line.startswith(f"-A {chain} ")]
        ours = [r for r in rules if "-j podnet-" in r]
        assert len(ours) == 1 and rules[0] == ours[0], (chain, rules)
