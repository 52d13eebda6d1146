"""Allocation and release of addresses by compare-and-swap on etcd.

Every write that changes who holds an address is ONE etcd transaction that compares the mod_revision of each key it
touches (the block and the handle) and writes them together. A process killed at any moment therefore leaves
either both or neither: never a block allocation without its handle record or the reverse. What a crash can leave
is an allocation whose pod never got (or lost) its endpoint; ``ipam.gc`` finds and releases those.

A node claims a free block of an eligible pool (create-only, with its affinity key in the same transaction), fills
it, then claims another. With no free block left it borrows a free address from another node's block, unless the
cluster's ``strictAffinity`` forbids it. Conflicts are retried a bounded number of times with jittered backoff.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from datastore import codec
from datastore import keys as k
from datastore import model as m
from datastore.etcd import Compare, Delete, EtcdClient, ModRevisionIs, Op, Put
from datastore.store import Store, Versioned
from ipam.blocks import block_cidr_for, contains, eligible_pools, first_free, ordinal_of, pool_blocks, pool_for
from ipam.errors import AddressInUse, InvalidRequest, NoPool, PoolExhausted, TooManyConflicts

DEFAULT_RETRIES = 100
MAX_BACKOFF = 0.05  # seconds; conflicts resolve in one etcd round trip, so waits stay short


def pod_handle(container_id: str) -> str:
    """The handle of a pod attachment, as the CNI plugin names it."""
    return f"k8s-pod-network.{container_id}"


def tunnel_handle(node: str, kind: str) -> str:
    return f"{kind}-tunnel-addr.{node}"


@dataclass
class _Cached:
    block: m.Block
    revision: int


class Ipam:
    """IPAM operations on one etcd. Thread-safe; keeps a cache of the blocks affine to the nodes it served so the
    common allocation is one etcd transaction (a stale cache only costs a failed compare and a re-read)."""

    def __init__(
        self,
        client: EtcdClient,
        *,
        max_retries: int = DEFAULT_RETRIES,
        rng: random.Random | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self.store = Store(client)
        self.max_retries = max_retries
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._lock = threading.Lock()
        self._cache: dict[str, dict[str, _Cached]] = {}  # node -> block cidr -> block

    # --- allocation ----------------------------------------------------------------------------------------

    def auto_assign(
        self,
        handle: str,
        node: str,
        *,
        pod: str | None = None,
        kind: str = "pod",
        pool: str | None = None,
        node_labels: Mapping[str, str] | None = None,
    ) -> str:
        """One IPv4 address for ``handle`` on ``node``. Idempotent: a handle that already holds an address gets it
        back. Raises ``NoPool``, ``PoolExhausted`` or ``TooManyConflicts``."""
        alloc = m.Allocation(handle, pod, kind)
        refreshed = False
        for attempt in range(self.max_retries):
            pools = eligible_pools(self._pools(), node_labels, pool)
            if not pools:
                raise NoPool(
                    f"no enabled IPv4 pool{' ' + pool if pool else ''} is available to node {node}"
                    " (check `agentctl ipam pools list`)"
                )
            blocks = self._affine_blocks(node, pools, refresh=False)
            target = next(((c, o) for c in blocks if (o := first_free(c.block)) is not None), None)
            if target is None and not refreshed:
                refreshed = True  # the cache may call a block full that has since freed up
                self._affine_blocks(node, pools, refresh=True)
                continue
            if target is not None:
                cached, ordinal = target
                if self._commit(node, cached, ordinal, alloc, affine=True):
                    return cached.block.address(ordinal)
                fresh = self.store.get(k.BlockKey(cached.block.cidr), m.Block)
                if fresh is None or fresh.mod_revision != cached.revision:
                    # Lost the block to a concurrent allocation: retry against its new state (one read, not all).
                    if fresh is not None and fresh.value.affine_node == node:
                        with self._lock:
                            self._cache.setdefault(node, {})[fresh.value.cidr] = _Cached(
                                fresh.value, fresh.mod_revision
                            )
                    self._backoff(attempt)
                    continue
                # The block was unchanged, so the handle compare failed: the handle already exists.
            else:
                outcome = self._claim_block(node, pools)
                if outcome == "claimed":
                    continue
                if outcome == "none":
                    ip = self._borrow(alloc, node, pools)
                    if ip is not None:
                        return ip
            existing = self.store.get(k.HandleKey(handle), m.Handle)
            if existing is not None and existing.value.ips:
                return existing.value.ips[0]
            self._backoff(attempt)
        raise TooManyConflicts(f"allocation for {handle} on {node} lost {self.max_retries} compare-and-swap rounds")

    def auto_assign_batch(
        self, requests: Sequence[tuple[str, str | None]], node: str, *, pool: str | None = None, refresh: bool = False
    ) -> dict[str, str]:
        """The fast path for several pods of one node at once: as many ``requests`` (handle, pod) as fit in the free
        addresses of the node's cached blocks, in ONE transaction that compares every block's revision and every
        handle's absence. Returns {handle: address} for those; {} when the transaction lost a compare. The caller
        sends the rest through ``auto_assign``, which claims blocks, borrows, retries and returns existing handles.
        ``refresh`` re-reads the node's blocks first (after a lost compare: another writer changed one).
        """
        pools = eligible_pools(self._pools(), None, pool)
        unique = list(dict.fromkeys(h for h, _ in requests))  # a handle twice would be two puts of one key
        pods = dict(requests)
        if not pools or not unique:
            return {}
        assigned: dict[str, str] = {}
        touched: list[tuple[_Cached, m.Block]] = []
        for cached in self._affine_blocks(node, pools, refresh=refresh):
            todo = unique[len(assigned) :]
            if not todo:
                break
            free = [o for o in range(cached.block.size) if o not in cached.block.allocations][: len(todo)]
            if not free:
                continue
            allocations = dict(cached.block.allocations)
            for handle, ordinal in zip(todo, free, strict=False):
                allocations[ordinal] = m.Allocation(handle, pods[handle], "pod")
                assigned[handle] = cached.block.address(ordinal)
            touched.append((cached, replace(cached.block, allocations=allocations)))
        if not assigned:
            return {}
        compares: list[Compare] = []
        ops: list[Op] = []
        for cached, block in touched:
            path = k.BlockKey(block.cidr).path
            compares.append(ModRevisionIs(path, cached.revision))
            ops.append(Put(path, codec.encode(block)))
        for handle, ip in assigned.items():
            path = k.HandleKey(handle).path
            compares.append(ModRevisionIs(path, 0))
            ops.append(Put(path, codec.encode(m.Handle(handle, (ip,), pods[handle], node))))
        result = self.client.txn(compares, ops)
        if not result.succeeded:
            return {}
        with self._lock:
            for _, block in touched:
                self._cache.setdefault(node, {})[block.cidr] = _Cached(block, result.revision)
        return assigned

    def assign_ip(self, ip: str, handle: str, node: str, *, pod: str | None = None, kind: str = "pod") -> str:
        """Allocate the specific address ``ip`` to ``handle``. Idempotent for the same handle; raises
        ``AddressInUse`` if another handle holds it, ``InvalidRequest`` if no enabled pool contains it."""
        alloc = m.Allocation(handle, pod, kind)
        for attempt in range(self.max_retries):
            owner = pool_for(self._pools(), ip)
            if owner is None:
                raise InvalidRequest(f"{ip} is not in any IP pool")
            if owner.disabled:
                raise InvalidRequest(f"{ip} is in pool {owner.cidr}, which is disabled")
            cidr = block_cidr_for(owner, ip)
            ordinal = ordinal_of(cidr, ip)
            got = self.store.get(k.BlockKey(cidr), m.Block)
            if got is None:
                # Nobody holds this block yet: claim it for this node along with the address.
                block = m.Block(cidr, f"node:{node}", {})
                cached = _Cached(block, 0)
                extra_ops: list[Op] = [Put(k.AffinityKey(node, cidr).path, codec.encode(m.Affinity(node, cidr)))]
                extra_cmp: list[Compare] = [ModRevisionIs(k.AffinityKey(node, cidr).path, 0)]
            else:
                held = got.value.allocations.get(ordinal)
                if held is not None:
                    if held.handle == handle:
                        return ip
                    raise AddressInUse(f"{ip} is already allocated to {held.handle}")
                cached = _Cached(got.value, got.mod_revision)
                extra_ops, extra_cmp = [], []
            if self._commit(node, cached, ordinal, alloc, affine=False, extra_ops=extra_ops, extra_cmp=extra_cmp):
                return ip
            self._backoff(attempt)
        raise TooManyConflicts(f"assigning {ip} to {handle} lost {self.max_retries} compare-and-swap rounds")

    def ensure_tunnel_address(self, node: str, kind: str = "vxlan") -> str:
        """The node's tunnel address (``kind`` ipip or vxlan), allocated once under its own handle and recorded on
        the node's record if it has one."""
        if kind not in ("ipip", "vxlan"):
            raise InvalidRequest(f"tunnel kind {kind!r} is not ipip or vxlan")
        labels: Mapping[str, str] = {}
        node_rec = self.store.get(k.NodeKey(node), m.Node)
        if node_rec is not None:
            labels = node_rec.value.labels
        ip = self.auto_assign(tunnel_handle(node, kind), node, kind="tunnel", node_labels=labels)
        for _ in range(self.max_retries):
            node_rec = self.store.get(k.NodeKey(node), m.Node)
            if node_rec is None:
                break
            current = node_rec.value
            if (current.tunnel_address if kind == "ipip" else current.vxlan_address) == ip:
                break
            updated = replace(current, tunnel_address=ip) if kind == "ipip" else replace(current, vxlan_address=ip)
            if self.client.txn(
                [ModRevisionIs(node_rec.path, node_rec.mod_revision)], [Put(node_rec.path, codec.encode(updated))]
            ).succeeded:
                break
        return ip

    # --- release -------------------------------------------------------------------------------------------

    def release_handle(self, handle: str, expect_revision: int | None = None) -> list[str]:
        """Release every address ``handle`` holds and delete its record. Idempotent: an unknown handle releases
        nothing. With ``expect_revision`` it releases only if the handle record is unchanged since then (GC's
        second look). Returns the released addresses."""
        for attempt in range(self.max_retries):
            got = self.store.get(k.HandleKey(handle), m.Handle)
            if got is None:
                return []
            if expect_revision is not None and got.mod_revision != expect_revision:
                return []
            compares: list[Compare] = [ModRevisionIs(got.path, got.mod_revision)]
            ops: list[Op] = [Delete(got.path)]
            changed = self._without_handles(got.value.ips, {handle}, compares, ops)
            if self.client.txn(compares, ops).succeeded:
                self._forget(changed)
                return list(got.value.ips)
            self._backoff(attempt)
        raise TooManyConflicts(f"releasing {handle} lost {self.max_retries} compare-and-swap rounds")

    def release_handles(self, handles: Sequence[str]) -> dict[str, list[str]] | None:
        """Release several handles in ONE transaction that compares every handle record's and every touched
        block's revision (the group-commit counterpart of ``release_handle``, for concurrent DELs on a node).
        Returns {handle: released addresses} (an unknown handle released nothing), or None when the transaction
        lost a compare: the caller then releases them one by one with ``release_handle``."""
        records = {h: got for h in dict.fromkeys(handles) if (got := self.store.get(k.HandleKey(h), m.Handle))}
        out: dict[str, list[str]] = {h: [] for h in handles}
        if not records:
            return out
        compares: list[Compare] = [ModRevisionIs(got.path, got.mod_revision) for got in records.values()]
        ops: list[Op] = [Delete(got.path) for got in records.values()]
        ips = [ip for got in records.values() for ip in got.value.ips]
        changed = self._without_handles(ips, set(records), compares, ops)
        result = self.client.txn(compares, ops)
        if not result.succeeded:
            return None
        # The new state is known: keep the node's blocks cached (the next ADD's batch needs no re-read).
        self._forget({cidr: None for cidr, block in changed.items() if block is None or block.affine_node is None})
        with self._lock:
            for block in changed.values():
                if block is not None and block.affine_node is not None:
                    self._cache.setdefault(block.affine_node, {})[block.cidr] = _Cached(block, result.revision)
        out.update({h: list(got.value.ips) for h, got in records.items()})
        return out

    def _without_handles(
        self, ips: Sequence[str], handles: set[str], compares: list[Compare], ops: list[Op]
    ) -> dict[str, m.Block | None]:
        """Add to a release transaction: each block holding one of ``ips`` rewritten without the allocations of
        ``handles`` (compared on its revision), or deleted when that leaves it empty and without affinity. Returns
        the blocks as they will be (None: deleted)."""
        changed: dict[str, m.Block | None] = {}
        for cidr, bv in self._blocks_holding(ips).items():
            kept = {o: a for o, a in bv.value.allocations.items() if a.handle not in handles}
            new = replace(bv.value, allocations=kept)
            compares.append(ModRevisionIs(bv.path, bv.mod_revision))
            if not kept and new.affinity is None:
                ops.append(Delete(bv.path))
                changed[cidr] = None
            else:
                ops.append(Put(bv.path, codec.encode(new)))
                changed[cidr] = new
        return changed

    def release_ip(self, ip: str) -> str | None:
        """Release one address, whoever holds it. Returns the handle it was released from (None if it was free)."""
        for attempt in range(self.max_retries):
            held = self._blocks_holding([ip])
            if not held:
                return None
            cidr, bv = next(iter(held.items()))
            ordinal = ordinal_of(cidr, ip)
            alloc = bv.value.allocations.get(ordinal)
            if alloc is None:
                return None
            kept = {o: a for o, a in bv.value.allocations.items() if o != ordinal}
            new = replace(bv.value, allocations=kept)
            compares: list[Compare] = [ModRevisionIs(bv.path, bv.mod_revision)]
            ops: list[Op] = [Delete(bv.path) if not kept and new.affinity is None else Put(bv.path, codec.encode(new))]
            hv = self.store.get(k.HandleKey(alloc.handle), m.Handle)
            if hv is not None:
                compares.append(ModRevisionIs(hv.path, hv.mod_revision))
                rest = tuple(x for x in hv.value.ips if x != ip)
                ops.append(Put(hv.path, codec.encode(replace(hv.value, ips=rest))) if rest else Delete(hv.path))
            if self.client.txn(compares, ops).succeeded:
                self._forget({cidr: None if not kept and new.affinity is None else new})
                return alloc.handle
            self._backoff(attempt)
        raise TooManyConflicts(f"releasing {ip} lost {self.max_retries} compare-and-swap rounds")

    def release_affinities(self, node: str) -> tuple[list[str], list[str]]:
        """Give up every block affinity of ``node`` (the node is leaving). Empty blocks are deleted; blocks still
        holding addresses lose their affinity and stay until those are released. Returns (deleted, kept)."""
        deleted: list[str] = []
        kept: list[str] = []
        for first in self.store.list(k.affinity_prefix(node), m.Affinity):
            outcome = self._release_affinity(node, first.value.cidr)
            if outcome == "deleted":
                deleted.append(first.value.cidr)
            elif outcome == "kept":
                kept.append(first.value.cidr)
        with self._lock:
            self._cache.pop(node, None)
        return deleted, kept

    def _release_affinity(self, node: str, cidr: str) -> str:
        for attempt in range(self.max_retries):
            aff = self.store.get(k.AffinityKey(node, cidr), m.Affinity)
            if aff is None:
                return "gone"
            bv = self.store.get(k.BlockKey(cidr), m.Block)
            compares: list[Compare] = [ModRevisionIs(aff.path, aff.mod_revision)]
            ops: list[Op] = [Delete(aff.path)]
            outcome = "deleted"
            if bv is not None and bv.value.affine_node == node:
                compares.append(ModRevisionIs(bv.path, bv.mod_revision))
                if bv.value.allocations:
                    ops.append(Put(bv.path, codec.encode(replace(bv.value, affinity=None))))
                    outcome = "kept"
                else:
                    ops.append(Delete(bv.path))
            if self.client.txn(compares, ops).succeeded:
                return outcome
            self._backoff(attempt)
        raise TooManyConflicts(f"releasing {node}'s affinity for {cidr} lost {self.max_retries} rounds")

    # --- internals -----------------------------------------------------------------------------------------

    def _pools(self) -> list[m.IPPool]:
        return [v.value for v in self.store.list(k.POOLS_PREFIX, m.IPPool)]

    def _affine_blocks(self, node: str, pools: Sequence[m.IPPool], refresh: bool) -> list[_Cached]:
        with self._lock:
            cached = self._cache.get(node)
        if cached is None or refresh:
            cached = {}
            for aff in self.store.list(k.affinity_prefix(node), m.Affinity):
                bv = self.store.get(k.BlockKey(aff.value.cidr), m.Block)
                if bv is not None and bv.value.affine_node == node:
                    cached[bv.value.cidr] = _Cached(bv.value, bv.mod_revision)
            with self._lock:
                self._cache[node] = cached
        in_pools = [c for c in cached.values() if any(contains(p.cidr, c.block.cidr.split("/")[0]) for p in pools)]
        return sorted(in_pools, key=lambda c: (len(c.block.allocations) == c.block.size, c.block.cidr))

    def _commit(
        self,
        node: str,
        cached: _Cached,
        ordinal: int,
        alloc: m.Allocation,
        *,
        affine: bool,
        extra_ops: Sequence[Op] = (),
        extra_cmp: Sequence[Compare] = (),
    ) -> bool:
        """One transaction: the block gains the allocation and the handle gains the address, or nothing."""
        block = replace(cached.block, allocations={**cached.block.allocations, ordinal: alloc})
        ip = block.address(ordinal)
        block_path = k.BlockKey(block.cidr).path
        handle_path = k.HandleKey(alloc.handle).path
        compares: list[Compare] = [ModRevisionIs(block_path, cached.revision), *extra_cmp]
        ops: list[Op] = [Put(block_path, codec.encode(block)), *extra_ops]
        existing = self.store.get(k.HandleKey(alloc.handle), m.Handle) if not affine else None
        if existing is not None:
            ips = tuple(dict.fromkeys((*existing.value.ips, ip)))
            compares.append(ModRevisionIs(handle_path, existing.mod_revision))
            ops.append(Put(handle_path, codec.encode(replace(existing.value, ips=ips))))
        else:
            compares.append(ModRevisionIs(handle_path, 0))
            ops.append(Put(handle_path, codec.encode(m.Handle(alloc.handle, (ip,), alloc.pod, node))))
        result = self.client.txn(compares, ops)
        if result.succeeded and block.affine_node is not None:
            with self._lock:
                self._cache.setdefault(block.affine_node, {})[block.cidr] = _Cached(block, result.revision)
        elif not result.succeeded:
            self._forget({block.cidr: None})
        return result.succeeded

    def _claim_block(self, node: str, pools: Sequence[m.IPPool]) -> str:
        """Claim the first free block of ``pools`` for ``node``: "claimed", "conflict" (lost a race), or "none"."""
        # Keys, not decoded values: a block key holding a malformed value still occupies its CIDR.
        taken = {kv.key for kv in self.client.get_prefix(k.BLOCKS_PREFIX)[0]}
        for pool in pools:
            for cidr in pool_blocks(pool):
                if k.BlockKey(cidr).path in taken:
                    continue
                block = m.Block(cidr, f"node:{node}", {})
                bpath, apath = k.BlockKey(cidr).path, k.AffinityKey(node, cidr).path
                result = self.client.txn(
                    [ModRevisionIs(bpath, 0), ModRevisionIs(apath, 0)],
                    [Put(bpath, codec.encode(block)), Put(apath, codec.encode(m.Affinity(node, cidr)))],
                )
                if not result.succeeded:
                    return "conflict"
                with self._lock:
                    self._cache.setdefault(node, {})[cidr] = _Cached(block, result.revision)
                return "claimed"
        return "none"

    def _borrow(self, alloc: m.Allocation, node: str, pools: Sequence[m.IPPool]) -> str | None:
        """A free address from any block of ``pools`` (another node's). None after losing a race (retry)."""
        names = ", ".join(p.cidr for p in pools)
        cfg = self.store.get(k.ClusterConfigKey(), m.ClusterConfig)
        if cfg is not None and cfg.value.strict_affinity:
            raise PoolExhausted(
                f"pool exhausted: node {node} has no free address in its blocks, no free block is left in {names},"
                " and strictAffinity forbids borrowing from other nodes' blocks"
            )
        for bv in self.store.list(k.BLOCKS_PREFIX, m.Block):
            if not any(contains(p.cidr, bv.value.cidr.split("/")[0]) for p in pools):
                continue
            ordinal = first_free(bv.value)
            if ordinal is None:
                continue
            if self._commit(node, _Cached(bv.value, bv.mod_revision), ordinal, alloc, affine=False):
                return bv.value.address(ordinal)
            return None
        raise PoolExhausted(f"pool exhausted: every address in {names} is allocated")

    def _blocks_holding(self, ips: Sequence[str]) -> dict[str, Versioned[m.Block]]:
        """The stored blocks that contain ``ips``, by CIDR. Found through the pools' block size; an address whose
        pool was deleted is looked for among all blocks."""
        pools = self._pools()
        out: dict[str, Versioned[m.Block]] = {}
        everything: list[Versioned[m.Block]] | None = None
        for ip in ips:
            owner = pool_for(pools, ip)
            if owner is not None:
                cidr = block_cidr_for(owner, ip)
                if cidr not in out and (bv := self.store.get(k.BlockKey(cidr), m.Block)) is not None:
                    out[cidr] = bv
                continue
            if everything is None:
                everything = self.store.list(k.BLOCKS_PREFIX, m.Block)
            for bv in everything:
                if contains(bv.value.cidr, ip):
                    out[bv.value.cidr] = bv
        return out

    def _forget(self, changed: Mapping[str, m.Block | None]) -> None:
        with self._lock:
            for blocks in self._cache.values():
                for cidr in changed:
                    blocks.pop(cidr, None)

    def _backoff(self, attempt: int) -> None:
        self._sleep(self._rng.uniform(0, min(MAX_BACKOFF, 0.001 * (2 ** min(attempt, 10)))))
