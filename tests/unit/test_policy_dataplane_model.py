"""The compiled chains, followed rule by rule in a model of netfilter (tests/unit/iptables_sim.py): every check of
the semantic table gives the same verdict as explain (over the real packet path: same node, node to node through
eth0, host to pod, pod to host, outside to pod), and the number of rules a new connection meets does not depend on
how many pods the cluster has."""

from __future__ import annotations

from typing import Any

import pytest

from agent.calc.policy import compile_node
from agent.calc.snapshot import Snapshot
from agent.calc.state import DataplaneState
from datastore import model as m
from testbed.netns import cali_name
from tests.unit import policy_world as w
from tests.unit.iptables_sim import Packet, hook
from tests.unit.test_policy_semantics import CASES

NODE_IPS = {"192.168.77.11": "node1", "192.168.77.12": "node2"}


def _where(who: str) -> tuple[str, str | None, str]:
    """(kind, node, ip) for a pod, a node address or an outside address."""
    if who in w.PODS:
        _, ip, node, _ = w.PODS[who]
        return "pod", node, ip
    if who in NODE_IPS:
        return "host", NODE_IPS[who], who
    return "outside", None, who


def deliver(states: dict[str, DataplaneState], src: str, dst: str, proto: str, port: int) -> tuple[bool, int]:
    """Whether a new connection's first packet gets through every hook on its way, and the rules it met."""
    skind, snode, sip = _where(src)
    dkind, dnode, dip = _where(dst)
    sif = cali_name(*src.split("/")) if skind == "pod" else ""
    dif = cali_name(*dst.split("/")) if dkind == "pod" else ""
    hops: list[tuple[str, str, str, str]] = []  # (node, hook, iif, oif)
    if skind == "pod":
        assert snode is not None
        if dkind == "host" and dnode == snode:
            hops.append((snode, "INPUT", sif, ""))
        elif dkind == "pod" and dnode == snode:
            hops.append((snode, "FORWARD", sif, dif))
        else:
            hops.append((snode, "FORWARD", sif, "eth0"))
    elif skind == "host":
        assert snode is not None
        hops.append((snode, "OUTPUT", "", dif if dnode == snode else "eth0"))
    if dkind == "pod" and dnode != snode:
        assert dnode is not None
        hops.append((dnode, "FORWARD", "eth0", dif))
    seen = 0
    for node, builtin, iif, oif in hops:
        pkt = Packet(sip, dip, proto, port, iif, oif)
        ok = hook(states[node], builtin, pkt)
        seen += pkt.rules_seen
        if not ok:
            return False, seen
    return True, seen


def _checks(checks: list[tuple[str, str, str, bool]]) -> list[tuple[str, str, str, int, bool]]:
    out = []
    for src, dst, port, allowed in checks:
        number, _, proto = port.partition("/")
        out.append((src, dst, (proto or "TCP").lower(), int(number), allowed))
    return out


@pytest.mark.parametrize(("policies", "checks"), [(p, c) for _, p, c in CASES], ids=[c[0] for c in CASES])
def test_chains_do_what_explain_says(
    policies: list[tuple[str, dict[str, Any]]], checks: list[tuple[str, str, str, bool]]
) -> None:
    snap = w.snapshot(*(w.policy(ns, f"p{i}", spec) for i, (ns, spec) in enumerate(policies)))
    states = {node: compile_node(snap, node).state for node in ("node1", "node2")}
    got = [(*c[:4], deliver(states, *c[:4])[0]) for c in _checks(checks)]
    assert got == _checks(checks)


def _cluster(pods: int, local: int = 100) -> Snapshot:
    """The seed's performance setup: one policy selecting every pod, three ipBlock + port ingress rules."""
    models: dict[tuple[str, str], m.Pod] = {}
    eps: dict[tuple[str, str, str, str], m.Endpoint] = {}
    for i in range(pods):
        ns, name = f"ns{i % 50}", f"p{i}"
        ip = f"10.{100 + i // 65536}.{(i // 256) % 256}.{i % 256}"
        node = "node1" if i < local else f"node{2 + i % 20}"
        models[(ns, name)] = m.Pod(ns, name, {"app": f"a{i % 300}"}, (ip,), node)
        if node == "node1":
            eps[(node, ns, name, "eth0")] = m.Endpoint(node, ns, name, "eth0", cali_name(ns, name), (f"{ip}/32",))
    rules = [{"from": [{"ipBlock": {"cidr": "198.51.100.0/24"}}], "ports": [{"port": p}]} for p in (9090, 8080, 80)]
    policies = {
        (f"ns{j}", "perf"): m.Policy(f"ns{j}", "perf", {"podSelector": {}, "ingress": rules}) for j in range(50)
    }
    return Snapshot(
        revision=1,
        in_sync=True,
        nodes={"node1": m.Node("node1", "192.168.77.11/24")},
        pods=models,
        policies=policies,
        endpoints=eps,
    )


def test_rules_per_packet_do_not_grow_with_pods() -> None:
    seen = {}
    for n in (2000, 50000):
        snap = _cluster(n)
        state = compile_node(snap, "node1").state
        # outside -> a local pod on an allowed port, on a denied port; local pod -> local pod (denied: not an ipBlock)
        a, b = ("ns0", "p0"), ("ns1", "p1")
        cases = [
            ("198.51.100.7", a, 80, True),
            ("198.51.100.7", a, 81, False),
            (snap.pods[b].ips[0], a, 80, False),
        ]
        counts = []
        for src, dst, port, allowed in cases:
            iif = cali_name(*b) if src == snap.pods[b].ips[0] else "eth0"
            pkt = Packet(src, snap.pods[dst].ips[0], "tcp", port, iif, cali_name(*dst))
            assert hook(state, "FORWARD", pkt) is allowed
            counts.append(pkt.rules_seen)
        seen[n] = counts
    assert seen[2000] == seen[50000], seen
    assert max(seen[50000]) < 40, seen
