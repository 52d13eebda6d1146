"""The semantic case table of tests/unit/test_policy_semantics.py, enforced by the real kernel: the same cluster
(pods on two nodes, outside hosts, node addresses as sources), each case's policies compiled per node and
programmed, every check probed with a real TCP connection or UDP exchange. The unit table asserts what the compiler
means; this one asserts that the kernel does it. (SCTP checks are left to the unit table: this kernel has no SCTP
sockets.)"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from testbed.netns import NetnsBed
from tests.conftest import SESSION_ID
from tests.netns.policy_bed import Cluster, build, listen_many, mismatches
from tests.unit import policy_world as w
from tests.unit.test_policy_semantics import CASES

pytestmark = pytest.mark.netns


def kernel_checks(checks: list[tuple[str, str, str, bool]]) -> list[tuple[str, str, str, int, bool]]:
    out = []
    for src, dst, port, allowed in checks:
        number, _, proto = port.partition("/")
        proto = (proto or "TCP").lower()
        if proto != "sctp":
            out.append((src, dst, proto, int(number), allowed))
    return out


ALL_CHECKS = [c for _, _, checks in CASES for c in kernel_checks(checks)]
NODE_IPS = ("192.168.77.11", "192.168.77.12")
POD_PORTS = sorted({(c[2], c[3]) for c in ALL_CHECKS if c[1] in w.PODS})
OUTSIDE_PORTS = sorted({(c[2], c[3]) for c in ALL_CHECKS if c[1] not in w.PODS and c[1] not in NODE_IPS})
NODE_PORTS = sorted({(c[2], c[3]) for c in ALL_CHECKS if c[1] in NODE_IPS})
OUTSIDE_IPS = (w.OUTSIDE, w.OUTSIDE_HIGH, "192.0.2.1")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    bed = NetnsBed(run_id=f"{SESSION_ID}pc")
    try:
        cluster = build(
            bed,
            {key: (node, ip, labels) for key, (labels, ip, node, _) in w.PODS.items()},
            w.NAMESPACES,
            listen=POD_PORTS,
            outside_listen=OUTSIDE_PORTS,
            named_ports={key: ports for key, (_, _, _, ports) in w.PODS.items()},
            outside_ips=OUTSIDE_IPS,
        )
        for node in cluster.nodes.values():
            listen_many(node.ns, NODE_PORTS)
        yield cluster
    finally:
        bed.close()


@pytest.mark.parametrize(("policies", "checks"), [(p, c) for _, p, c in CASES], ids=[c[0] for c in CASES])
def test_case_in_kernel(
    cluster: Cluster, policies: list[tuple[str, dict[str, Any]]], checks: list[tuple[str, str, str, bool]]
) -> None:
    probes = kernel_checks(checks)
    assert {c[4] for c in probes} == {True, False}
    cluster.program([w.policy(ns, f"p{i}", spec) for i, (ns, spec) in enumerate(policies)])
    assert mismatches(cluster, probes) == []


def test_table_size() -> None:
    assert len(CASES) >= 30
