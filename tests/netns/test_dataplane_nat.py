"""The writer and a second table: natOutgoing's nat chain, sets and POSTROUTING jump are written incrementally, switched
off and on again without duplicating or losing the jump, adopted by a new writer without a rewrite, and removed by
``remove_all`` even by a writer that never wrote them. Real kernel, both backends. (Packets: test_nat_outgoing.py.)"""

from __future__ import annotations

import pytest

from agent.calc.nat import nat_state
from agent.calc.snapshot import Snapshot
from agent.calc.state import DataplaneState
from agent.dataplane.backend import Backend
from agent.dataplane.cmd import CommandRunner
from agent.dataplane.programmer import PolicyDataplane
from datastore import model as m
from testbed.netns import NetnsBed

pytestmark = pytest.mark.netns
BACKENDS = ["legacy", "nft"]


def nat_lines(runner: CommandRunner, backend: str) -> list[str]:
    text = runner.run([f"iptables-{backend}-save", "-t", "nat"]).stdout
    return [line for line in text.splitlines() if "podnet" in line and not line.startswith("#")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_nat_table_is_written_toggled_adopted_and_removed(netns_bed: NetnsBed, backend: str) -> None:
    ns = netns_bed.netns("n1")
    runner = CommandRunner(ns.name)
    nodes = {"n1": m.Node("n1", "192.168.77.11/24"), "n2": m.Node("n2", "192.168.77.12/24")}

    def state(nat: bool) -> DataplaneState:
        pool = m.IPPool("10.244.0.0/16", nat_outgoing=nat)
        return nat_state(Snapshot(in_sync=True, pools={pool.cidr: pool}, nodes=nodes), "n1")

    dp = PolicyDataplane(runner, Backend(backend))
    try:
        assert dp.apply(state(False), full=True, delete_stale=True).wrote is False
        assert nat_lines(runner, backend) == []
        for _ in range(2):  # on (incremental), off, on again: one jump each time, then none
            on = dp.apply(state(True), delete_stale=True)
            assert not on.full and on.chains_written == ["nat/podnet-POSTROUTING"]
            assert nat_lines(runner, backend).count("-A POSTROUTING -j podnet-POSTROUTING") == 1
            assert dp.apply(state(True), delete_stale=True).wrote is False
            off = dp.apply(state(False), delete_stale=True)
            assert not off.full and off.chains_deleted == ["nat/podnet-POSTROUTING"] and off.sets_destroyed == 3
            assert nat_lines(runner, backend) == []
        dp.apply(state(True), delete_stale=True)

        # A new writer (a restart) adopts it as it is.
        assert PolicyDataplane(runner, Backend(backend)).apply(state(True), full=True).wrote is False
        # A node joins: a set delta, the chain is not rewritten.
        nodes["n3"] = m.Node("n3", "192.168.77.13/24")
        joined = dp.apply(state(True), delete_stale=True)
        assert joined.chains_written == [] and joined.sets_changed == 1
        assert "192.168.77.13" in runner.run(["ipset", "list", "podnet-all-hosts"]).stdout
    finally:
        PolicyDataplane(runner, Backend(backend)).remove_all()  # a writer that never wrote it
    assert nat_lines(runner, backend) == []
    assert "podnet" not in runner.run(["ipset", "list", "-n"]).stdout
