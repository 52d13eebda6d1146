"""IP pools: list, add (overlaps refused), disable, delete (refused while addresses are allocated)."""

from __future__ import annotations

from dataclasses import replace

from datastore import keys as k
from datastore import model as m
from datastore.errors import AlreadyExists
from datastore.etcd import Delete, EtcdClient, ModRevisionIs
from datastore.store import Store
from ipam.blocks import contains, network, overlaps
from ipam.errors import InvalidRequest, PoolInUse, PoolOverlap


def list_pools(store: Store) -> list[m.IPPool]:
    return sorted((v.value for v in store.list(k.POOLS_PREFIX, m.IPPool)), key=lambda p: network(p.cidr))


def add_pool(store: Store, pool: m.IPPool) -> m.IPPool:
    """Create a pool. Raises ``PoolOverlap`` if it overlaps an existing pool (the same CIDR included)."""
    for other in list_pools(store):
        if overlaps(other.cidr, pool.cidr):
            raise PoolOverlap(f"pool {pool.cidr} overlaps the existing pool {other.cidr}")
    try:
        store.create(pool)
    except AlreadyExists:
        raise PoolOverlap(f"pool {pool.cidr} already exists") from None
    return pool


def set_disabled(store: Store, cidr: str, disabled: bool) -> m.IPPool:
    got = store.get(k.PoolKey(_norm(cidr)), m.IPPool)
    if got is None:
        raise InvalidRequest(f"no pool {cidr}")
    pool = replace(got.value, disabled=disabled)
    store.cas(pool, got.mod_revision)
    return pool


def delete_pool(client: EtcdClient, cidr: str) -> None:
    """Delete a pool and its empty blocks. Refused (``PoolInUse``) while any address in it is allocated.

    The pool is disabled first, so no node claims a new block of it while its blocks are being removed."""
    store = Store(client)
    cidr = _norm(cidr)
    if store.get(k.PoolKey(cidr), m.IPPool) is None:
        raise InvalidRequest(f"no pool {cidr}")
    blocks = [b for b in store.list(k.BLOCKS_PREFIX, m.Block) if contains(cidr, b.value.cidr.split("/")[0])]
    used = sum(len(b.value.allocations) for b in blocks)
    if used:
        raise PoolInUse(f"pool {cidr} has {used} allocated address(es); release them before deleting the pool")
    set_disabled(store, cidr, True)
    for b in store.list(k.BLOCKS_PREFIX, m.Block):
        if not contains(cidr, b.value.cidr.split("/")[0]):
            continue
        if b.value.allocations:  # allocated after our first look: leave the pool (disabled) in place
            raise PoolInUse(f"pool {cidr}: block {b.value.cidr} gained allocations; pool left disabled")
        ops: list[Delete] = [Delete(b.path)]
        if b.value.affine_node:
            ops.append(Delete(k.AffinityKey(b.value.affine_node, b.value.cidr).path))
        if not client.txn([ModRevisionIs(b.path, b.mod_revision)], ops).succeeded:
            raise PoolInUse(f"pool {cidr}: block {b.value.cidr} changed while deleting; pool left disabled")
    client.delete(k.PoolKey(cidr).path)


def _norm(cidr: str) -> str:
    try:
        return str(network(cidr))
    except ValueError as exc:
        raise InvalidRequest(f"invalid CIDR {cidr!r}: {exc}") from None
