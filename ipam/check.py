"""Consistency check of IPAM against endpoints and pods: leaks and contradictions.

``load`` reads blocks, handles, endpoints, pods and nodes at ONE etcd revision (so a concurrent allocation cannot
look like a contradiction); ``analyse`` is pure. An allocation is *leaked* when nothing uses it: a pod address whose
endpoint is gone and whose pod is gone (or lists other addresses); a tunnel address whose node is gone.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from datastore import keys as k
from datastore import model as m
from datastore.etcd import EtcdClient
from datastore.store import Store
from ipam.blocks import overlaps


@dataclass(frozen=True)
class IpamView:
    revision: int
    blocks: list[m.Block]
    handles: dict[str, tuple[m.Handle, int]]  # handle -> (record, mod_revision)
    endpoints: list[m.Endpoint]
    pods: dict[str, m.Pod]  # "<ns>/<name>" -> pod
    nodes: set[str]


@dataclass(frozen=True)
class Leak:
    handle: str
    ip: str
    kind: str
    pod: str | None
    block: str
    node: str | None  # the block's affine node

    def to_json(self) -> dict[str, Any]:
        return {
            "handle": self.handle,
            "ip": self.ip,
            "kind": self.kind,
            "pod": self.pod,
            "block": self.block,
            "node": self.node,
        }


PROBLEM_KINDS = (
    "endpoint-not-allocated",  # an endpoint's address is not allocated, or is allocated to another handle
    "ip-in-two-places",  # two endpoints, two handles or two overlapping blocks claim one address
    "handle-without-ips",  # a handle record holding nothing, or listing addresses its blocks do not give it
    "allocation-without-handle",  # a block allocation whose handle record is missing or does not list it
)


@dataclass(frozen=True)
class Problem:
    kind: str
    subject: str
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "subject": self.subject, "detail": self.detail}


@dataclass(frozen=True)
class CheckReport:
    revision: int
    leaks: tuple[Leak, ...] = ()
    problems: tuple[Problem, ...] = ()
    handle_revisions: dict[str, int] = field(default_factory=dict)
    used_handles: frozenset[str] = frozenset()  # handles with at least one address in use

    @property
    def ok(self) -> bool:
        return not self.leaks and not self.problems

    @property
    def leaked_handles(self) -> set[str]:
        """Handles none of whose addresses is in use: what GC may release whole."""
        return {leak.handle for leak in self.leaks} - self.used_handles

    def to_json(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "ok": self.ok,
            "leakedHandles": sorted(self.leaked_handles),
            "leaks": [x.to_json() for x in self.leaks],
            "problems": [x.to_json() for x in self.problems],
        }


def load(client: EtcdClient) -> IpamView:
    store = Store(client)
    rev = client.revision()
    return IpamView(
        revision=rev,
        blocks=[v.value for v in store.list(k.BLOCKS_PREFIX, m.Block, rev)],
        handles={v.value.handle: (v.value, v.mod_revision) for v in store.list(k.HANDLES_PREFIX, m.Handle, rev)},
        endpoints=[v.value for v in store.list(k.ENDPOINTS_PREFIX, m.Endpoint, rev)],
        pods={f"{v.value.namespace}/{v.value.name}": v.value for v in store.list(k.PODS_PREFIX, m.Pod, rev)},
        nodes={v.value.name for v in store.list(k.NODES_PREFIX, m.Node, rev)},
    )


def check(client: EtcdClient) -> CheckReport:
    return analyse(load(client))


def _bare(ip: str) -> str:
    return str(ipaddress.ip_interface(ip).ip)


def analyse(view: IpamView) -> CheckReport:
    problems: list[Problem] = []
    leaks: list[Leak] = []
    used: set[str] = set()
    by_handle_ep: dict[str, list[m.Endpoint]] = defaultdict(list)
    ep_by_ip: dict[str, list[m.Endpoint]] = defaultdict(list)
    for ep in view.endpoints:
        if ep.handle:
            by_handle_ep[ep.handle].append(ep)
        for ip in ep.ips:
            ep_by_ip[_bare(ip)].append(ep)

    allocated: dict[str, list[tuple[str, m.Allocation]]] = defaultdict(list)  # ip -> [(block, allocation)]
    for block in view.blocks:
        for ordinal, alloc in sorted(block.allocations.items()):
            allocated[block.address(ordinal)].append((block.cidr, alloc))

    for i, a in enumerate(view.blocks):
        for b in view.blocks[i + 1 :]:
            if overlaps(a.cidr, b.cidr):
                problems.append(Problem("ip-in-two-places", a.cidr, f"blocks {a.cidr} and {b.cidr} overlap"))

    for block in view.blocks:
        for ordinal, alloc in sorted(block.allocations.items()):
            ip = block.address(ordinal)
            rec = view.handles.get(alloc.handle)
            if rec is None or ip not in rec[0].ips:
                problems.append(
                    Problem(
                        "allocation-without-handle",
                        ip,
                        f"{ip} in block {block.cidr} names handle {alloc.handle}, which does not list it",
                    )
                )
            if not _in_use(
                view, ip, alloc=alloc, rec=rec[0] if rec else None, by_handle_ep=by_handle_ep, ep_by_ip=ep_by_ip
            ):
                leaks.append(Leak(alloc.handle, ip, alloc.kind, alloc.pod, block.cidr, block.affine_node))
            else:
                used.add(alloc.handle)

    for ip, holders in sorted(allocated.items()):
        if len({h.handle for _, h in holders}) > 1 or len(holders) > 1:
            names = ", ".join(f"{h.handle} (block {b})" for b, h in holders)
            problems.append(Problem("ip-in-two-places", ip, f"{ip} is allocated more than once: {names}"))

    listed: dict[str, list[str]] = defaultdict(list)
    for name, (record, _) in sorted(view.handles.items()):
        if not record.ips:
            problems.append(Problem("handle-without-ips", name, f"handle {name} holds no address"))
        for ip in record.ips:
            listed[ip].append(name)
            if not any(h.handle == name for _, h in allocated.get(ip, [])):
                problems.append(
                    Problem("handle-without-ips", name, f"handle {name} lists {ip}, but no block allocates it to it")
                )
    for ip, holders_of in sorted(listed.items()):
        if len(holders_of) > 1:
            problems.append(Problem("ip-in-two-places", ip, f"{ip} is listed by handles {', '.join(holders_of)}"))

    for ip, eps in sorted(ep_by_ip.items()):
        if len(eps) > 1:
            where = ", ".join(f"{e.node}/{e.namespace}/{e.pod}/{e.iface}" for e in eps)
            problems.append(Problem("ip-in-two-places", ip, f"{ip} is used by endpoints {where}"))
        for ep in eps:
            subject = f"{ep.node}/{ep.namespace}/{ep.pod}/{ep.iface}"
            holders = allocated.get(ip, [])
            if not holders:
                problems.append(
                    Problem("endpoint-not-allocated", subject, f"endpoint uses {ip}, which is not allocated")
                )
            elif ep.handle and all(h.handle != ep.handle for _, h in holders):
                problems.append(
                    Problem(
                        "endpoint-not-allocated",
                        subject,
                        f"endpoint (handle {ep.handle}) uses {ip}, which is allocated to {holders[0][1].handle}",
                    )
                )
    return CheckReport(
        revision=view.revision,
        leaks=tuple(leaks),
        problems=tuple(problems),
        handle_revisions={name: rev for name, (_, rev) in view.handles.items()},
        used_handles=frozenset(used),
    )


def _in_use(
    view: IpamView,
    ip: str,
    *,
    alloc: m.Allocation,
    rec: m.Handle | None,
    by_handle_ep: dict[str, list[m.Endpoint]],
    ep_by_ip: dict[str, list[m.Endpoint]],
) -> bool:
    if alloc.kind == "tunnel":
        node = rec.node if rec is not None else None
        return node is not None and node in view.nodes
    if by_handle_ep.get(alloc.handle):
        return True
    if any(ep.handle is None for ep in ep_by_ip.get(ip, [])):
        return True  # an endpoint written without a handle still uses the address
    pod = view.pods.get(alloc.pod) if alloc.pod else None
    return pod is not None and (not pod.ips or ip in pod.ips)
