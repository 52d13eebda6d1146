"""natOutgoing: the nat-table chain and ipsets that masquerade what pods of a ``natOutgoing`` pool send out of the
cluster (pure: Snapshot → DataplaneState, merged with the policy state by the writer).

As Calico does: two sets of pools, every pool and the natOutgoing ones, and one rule in a chain hooked into
POSTROUTING: from a natOutgoing pool, to anything in no pool, masquerade. Nodes are no outside destination either:
every node's address, tunnel and VXLAN addresses, and this node's own subnet form a third set the rule excludes, so
a pod talking to a node (its own or another) keeps its address. Disabled pools count (their pods keep their
addresses); IPv6 pools are left out (podnet writes IPv4 iptables only). Without a natOutgoing pool nothing is
desired in the nat table at all (no per-connection cost there; the writer removes what a previous state left).
"""

from __future__ import annotations

import ipaddress

from agent.calc.snapshot import Snapshot
from agent.calc.state import Chain, DataplaneState, IpSet, KernelJump

TABLE = "nat"
CHAIN = "podnet-POSTROUTING"
ALL_POOLS = "podnet-all-pools"
MASQ_POOLS = "podnet-masq-pools"
ALL_HOSTS = "podnet-all-hosts"


def _nets(cidr: str) -> list[str]:
    net = ipaddress.ip_network(cidr, strict=False)
    # ipset's hash:net cannot hold a /0: two /1 halves cover the same space.
    return [str(n) for n in net.subnets(new_prefix=1)] if net.prefixlen == 0 else [str(net)]


def _v4(text: str) -> bool:
    return ipaddress.ip_interface(text).version == 4


def host_nets(snap: Snapshot, node: str) -> frozenset[str]:
    """The destinations that are nodes: every node's underlay, tunnel and VXLAN address, and this node's subnet."""
    out: set[str] = set()
    for n in snap.nodes.values():
        for addr in (n.ip, n.tunnel_address, n.vxlan_address):
            if addr and _v4(addr):
                out.add(f"{ipaddress.ip_interface(addr).ip}/32")
    me = snap.nodes.get(node)
    if me is not None and _v4(me.ip):
        out.update(_nets(str(ipaddress.ip_interface(me.ip).network)))
    return frozenset(out)


def nat_state(snap: Snapshot, node: str) -> DataplaneState:
    pools = [p for p in snap.pools.values() if _v4(p.cidr)]
    masq = [p.cidr for p in pools if p.nat_outgoing]
    if not masq:
        return DataplaneState()
    sets = [
        IpSet(ALL_POOLS, "hash:net", frozenset(n for p in pools for n in _nets(p.cidr))),
        IpSet(MASQ_POOLS, "hash:net", frozenset(n for c in masq for n in _nets(c))),
        IpSet(ALL_HOSTS, "hash:net", host_nets(snap, node)),
    ]
    rule = (
        f"-m set --match-set {MASQ_POOLS} src -m set ! --match-set {ALL_POOLS} dst "
        f"-m set ! --match-set {ALL_HOSTS} dst -j MASQUERADE"
    )
    return DataplaneState(
        ipsets={s.name: s for s in sets},
        tables={TABLE: {CHAIN: Chain(CHAIN, (rule,))}},
        jumps=(KernelJump(TABLE, "POSTROUTING", f"-j {CHAIN}"),),
    )


def merged(*states: DataplaneState) -> DataplaneState:
    """One state holding the sets, chains and jumps of each (their names do not overlap: each part owns its own)."""
    tables: dict[str, dict[str, Chain]] = {}
    for s in states:
        for table, chains in s.tables.items():
            tables[table] = {**tables.get(table, {}), **chains}
    return DataplaneState(
        ipsets={n: i for s in states for n, i in s.ipsets.items()},
        tables=tables,
        jumps=tuple(j for s in states for j in s.jumps),
    )
