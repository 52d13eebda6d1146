"""Block arithmetic: which blocks a pool has, which block holds an address, which ordinals are free. Pure: no I/O.

Every address of a block is usable, including a block's first and last: pods get /32s routed to their veth, so
there is no subnet broadcast or network address to protect (as in Calico).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Mapping

from datastore.model import Block, IPPool

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def network(cidr: str) -> IPNetwork:
    return ipaddress.ip_network(cidr, strict=True)


def pool_blocks(pool: IPPool) -> Iterator[str]:
    """The pool's block CIDRs in address order (lazily: an IPv6 pool has a great many)."""
    for net in network(pool.cidr).subnets(new_prefix=pool.block_size):
        yield str(net)


def block_count(pool: IPPool) -> int:
    return 1 << (pool.block_size - network(pool.cidr).prefixlen)


def contains(cidr: str, ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    net = network(cidr)
    return addr.version == net.version and addr in net


def block_cidr_for(pool: IPPool, ip: str) -> str:
    """The CIDR of the pool's block that holds ``ip``. Raises ``ValueError`` if the pool does not hold it."""
    if not contains(pool.cidr, ip):
        raise ValueError(f"{ip} is not in pool {pool.cidr}")
    return str(ipaddress.ip_network(f"{ip}/{pool.block_size}", strict=False))


def pool_for(pools: Iterable[IPPool], ip: str) -> IPPool | None:
    for pool in pools:
        if contains(pool.cidr, ip):
            return pool
    return None


def ordinal_of(block_cidr: str, ip: str) -> int:
    net = network(block_cidr)
    addr = ipaddress.ip_address(ip)
    if addr.version != net.version or addr not in net:
        raise ValueError(f"{ip} is not in block {block_cidr}")
    return int(addr) - int(net.network_address)


def free_ordinals(block: Block) -> list[int]:
    return [i for i in range(block.size) if i not in block.allocations]


def first_free(block: Block) -> int | None:
    for i in range(block.size):
        if i not in block.allocations:
            return i
    return None


def overlaps(a: str, b: str) -> bool:
    na, nb = network(a), network(b)
    return na.version == nb.version and na.overlaps(nb)


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """A pool's node selector: every key=value must be among the node's labels (empty selects all nodes)."""
    return all(labels.get(k) == v for k, v in selector.items())


def eligible_pools(
    pools: Iterable[IPPool], labels: Mapping[str, str] | None = None, only: str | None = None
) -> list[IPPool]:
    """Enabled IPv4 pools this node may allocate from, in CIDR order; ``only`` restricts to one pool CIDR."""
    out = [
        p
        for p in pools
        if not p.disabled
        and network(p.cidr).version == 4
        and selector_matches(p.node_selector, labels or {})
        and (only is None or p.cidr == str(network(only)))
    ]
    return sorted(out, key=lambda p: network(p.cidr))
