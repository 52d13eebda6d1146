"""natOutgoing's desired state (agent.calc.nat): sets of pools and hosts, one masquerade rule, one POSTROUTING jump;
nothing at all without a natOutgoing pool. (Packets: tests/netns/test_nat_outgoing.py.)"""

from __future__ import annotations

from agent.calc.nat import ALL_HOSTS, ALL_POOLS, CHAIN, MASQ_POOLS, merged, nat_state
from agent.calc.snapshot import Snapshot
from agent.calc.state import Chain, DataplaneState, IpSet, KernelJump
from agent.dataplane.render import check_names
from datastore import model as m


def snap(*pools: m.IPPool) -> Snapshot:
    nodes = {
        "n1": m.Node("n1", "192.168.77.11/24", tunnel_address="10.244.0.1", vxlan_address="10.244.0.2"),
        "n2": m.Node("n2", "192.168.78.12/24"),
    }
    return Snapshot(in_sync=True, pools={p.cidr: p for p in pools}, nodes=nodes)


def test_a_nat_outgoing_pool_masquerades_to_anything_outside_pools_and_nodes() -> None:
    state = nat_state(
        snap(
            m.IPPool("10.244.0.0/16", nat_outgoing=True),
            m.IPPool("10.245.0.0/16"),
            m.IPPool("10.246.0.0/16", nat_outgoing=True, disabled=True),  # its pods keep their addresses
            m.IPPool("fd00:1::/64", block_size=122, nat_outgoing=True),  # IPv6: not written (IPv4 iptables only)
        ),
        "n1",
    )
    assert state.ipsets == {
        ALL_POOLS: IpSet(ALL_POOLS, "hash:net", frozenset({"10.244.0.0/16", "10.245.0.0/16", "10.246.0.0/16"})),
        MASQ_POOLS: IpSet(MASQ_POOLS, "hash:net", frozenset({"10.244.0.0/16", "10.246.0.0/16"})),
        ALL_HOSTS: IpSet(
            ALL_HOSTS,
            "hash:net",
            frozenset({"192.168.77.11/32", "10.244.0.1/32", "10.244.0.2/32", "192.168.78.12/32", "192.168.77.0/24"}),
        ),
    }
    assert state.tables == {
        "nat": {
            CHAIN: Chain(
                CHAIN,
                (
                    f"-m set --match-set {MASQ_POOLS} src -m set ! --match-set {ALL_POOLS} dst "
                    f"-m set ! --match-set {ALL_HOSTS} dst -j MASQUERADE",
                ),
            )
        }
    }
    assert state.jumps == (KernelJump("nat", "POSTROUTING", f"-j {CHAIN}"),)
    check_names(state.tables, state.ipsets)


def test_without_a_nat_outgoing_pool_nothing_is_desired_in_the_nat_table() -> None:
    assert nat_state(snap(m.IPPool("10.244.0.0/16")), "n1") == DataplaneState()
    assert nat_state(snap(), "n1") == DataplaneState()


def test_merged_keeps_both_parts() -> None:
    policy = DataplaneState(
        ipsets={"podnet-s-x": IpSet("podnet-s-x", "hash:ip")},
        tables={"filter": {"podnet-FORWARD": Chain("podnet-FORWARD")}},
        jumps=(KernelJump("filter", "FORWARD", "-j podnet-FORWARD"),),
    )
    nat = nat_state(snap(m.IPPool("10.244.0.0/16", nat_outgoing=True)), "n1")
    both = merged(policy, nat)
    assert set(both.ipsets) == {"podnet-s-x", ALL_POOLS, MASQ_POOLS, ALL_HOSTS}
    assert both.tables == {**policy.tables, **nat.tables}
    assert both.jumps == (*policy.jumps, *nat.jumps)
