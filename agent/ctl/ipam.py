"""`agentctl ipam`: pools, usage, consistency check, release, GC."""

from __future__ import annotations

import ipaddress
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from agent.ctl.context import CtlContext, output_option, pass_ctl
from agent.ctl.output import emit, table
from datastore import keys as k
from datastore import model as m
from datastore.fields import ModelError
from datastore.store import Store
from ipam.allocator import Ipam
from ipam.blocks import contains, network
from ipam.check import CheckReport, check
from ipam.errors import IpamError
from ipam.gc import LeakCollector
from ipam.pools import add_pool, delete_pool, list_pools


@contextmanager
def _errors() -> Iterator[None]:
    """IPAM failures become one clear line and exit status 1 (etcd failures: the top group does it)."""
    try:
        yield
    except (IpamError, ModelError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


@click.group("ipam")
def ipam_group() -> None:
    """IP address management: pools, usage, consistency, release."""


@ipam_group.group("pools")
def pools_group() -> None:
    """List, add and delete IP pools."""


def _pool_row(p: m.IPPool) -> list[Any]:
    sel = ",".join(f"{a}={b}" for a, b in sorted(p.node_selector.items())) or "all()"
    return [p.cidr, f"/{p.block_size}", p.encapsulation, p.cross_subnet, p.nat_outgoing, p.disabled, sel]


@pools_group.command("list")
@output_option
@pass_ctl
def pools_list(ctl: CtlContext, output: str) -> None:
    """Show the configured pools."""
    with _errors():
        pools = list_pools(Store(ctl.client))
    emit(
        [p.to_json() for p in pools],
        ["CIDR", "BLOCK", "ENCAP", "CROSS-SUBNET", "NAT-OUTGOING", "DISABLED", "NODE-SELECTOR"],
        [_pool_row(p) for p in pools],
        output,
    )


def _selector(value: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in filter(None, (x.strip() for x in value.split(","))):
        key, sep, val = part.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{part!r} is not key=value", param_hint="--node-selector")
        out[key] = val
    return out


@pools_group.command("add")
@click.argument("cidr")
@click.option("--block-size", type=int, default=26, show_default=True, help="Prefix length of the pool's blocks.")
@click.option(
    "--encapsulation",
    type=click.Choice(m.ENCAPSULATIONS),
    default=None,
    help="Default: the cluster config's encapsulation (/podnet/v1/config/cluster), vxlan without one.",
)
@click.option("--cross-subnet", is_flag=True, help="Encapsulate only between nodes on different subnets.")
@click.option("--nat-outgoing", is_flag=True, help="Masquerade traffic leaving the pool.")
@click.option("--disabled", is_flag=True, help="Create the pool disabled (no new allocations).")
@click.option("--node-selector", default="", help="Comma-separated key=value node labels (default: all nodes).")
@pass_ctl
def pools_add(  # noqa: PLR0917 - one parameter per click option
    ctl: CtlContext,
    cidr: str,
    block_size: int,
    encapsulation: str | None,
    cross_subnet: bool,
    nat_outgoing: bool,
    disabled: bool,
    node_selector: str,
) -> None:
    """Add a pool (refused if it overlaps an existing one)."""
    with _errors():
        try:
            net = ipaddress.ip_network(cidr, strict=True)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="CIDR") from None
        if nat_outgoing and net.version == 6:
            # podnet writes IPv4 iptables only: accepting it would store a setting that does nothing.
            raise click.BadParameter("natOutgoing is not supported on IPv6 pools", param_hint="--nat-outgoing")
        store = Store(ctl.client)
        if encapsulation is None:
            cluster = store.get(k.ClusterConfigKey(), m.ClusterConfig)
            encapsulation = (cluster.value if cluster is not None else m.ClusterConfig()).encapsulation
        pool = m.IPPool(
            str(net), block_size, encapsulation, cross_subnet, nat_outgoing, disabled, _selector(node_selector)
        )
        add_pool(store, pool)
    click.echo(f"added pool {pool.cidr} ({pool.encapsulation})")


@pools_group.command("delete")
@click.argument("cidr")
@pass_ctl
def pools_delete(ctl: CtlContext, cidr: str) -> None:
    """Delete a pool (refused while addresses in it are allocated)."""
    with _errors():
        delete_pool(ctl.client, cidr)
    click.echo(f"deleted pool {cidr}")


def usage(store: Store) -> dict[str, Any]:
    """Per pool, per node and per block: capacity, used, free (one consistent read)."""
    rev = store.client.revision()
    pools = [v.value for v in store.list(k.POOLS_PREFIX, m.IPPool, rev)]
    blocks = sorted((v.value for v in store.list(k.BLOCKS_PREFIX, m.Block, rev)), key=lambda b: network(b.cidr))
    per_pool = []
    for p in pools:
        mine = [b for b in blocks if contains(p.cidr, b.cidr.split("/")[0])]
        used = sum(len(b.allocations) for b in mine)
        capacity = network(p.cidr).num_addresses
        per_pool.append(
            {
                "cidr": p.cidr,
                "disabled": p.disabled,
                "blocks": len(mine),
                "capacity": capacity,
                "used": used,
                "free": capacity - used,
            }
        )
    nodes: dict[str, dict[str, int]] = defaultdict(lambda: {"blocks": 0, "capacity": 0, "used": 0})
    for b in blocks:
        row = nodes[b.affine_node or "-"]
        row["blocks"] += 1
        row["capacity"] += b.size
        row["used"] += len(b.allocations)
    per_node = [{"node": n, **v, "free": v["capacity"] - v["used"]} for n, v in sorted(nodes.items())]
    per_block = [
        {"cidr": b.cidr, "node": b.affine_node, "used": len(b.allocations), "free": b.size - len(b.allocations)}
        for b in blocks
    ]
    return {"revision": rev, "pools": per_pool, "nodes": per_node, "blocks": per_block}


@ipam_group.command("show")
@click.option("--blocks", "show_blocks", is_flag=True, help="Also list every block.")
@output_option
@pass_ctl
def show(ctl: CtlContext, show_blocks: bool, output: str) -> None:
    """Usage per pool and per node (blocks, used, free)."""
    with _errors():
        data = usage(Store(ctl.client))
    if output == "json":
        emit(data, [], [], "json")
        return
    cols = ["blocks", "capacity", "used", "free"]
    click.echo(
        table(
            ["POOL", "BLOCKS", "CAPACITY", "USED", "FREE"], [[p["cidr"], *(p[c] for c in cols)] for p in data["pools"]]
        )
    )
    click.echo()
    click.echo(
        table(
            ["NODE", "BLOCKS", "CAPACITY", "USED", "FREE"], [[n["node"], *(n[c] for c in cols)] for n in data["nodes"]]
        )
    )
    if show_blocks:
        click.echo()
        click.echo(
            table(
                ["BLOCK", "NODE", "USED", "FREE"],
                [[b["cidr"], b["node"] or "-", b["used"], b["free"]] for b in data["blocks"]],
            )
        )


def _report_text(report: CheckReport) -> str:
    if report.ok:
        return f"IPAM is consistent (revision {report.revision})."
    parts = []
    if report.leaks:
        parts.append(f"{len(report.leaked_handles)} leaked handle(s): allocated, but no endpoint or pod uses them")
        parts.append(
            table(
                ["HANDLE", "IP", "KIND", "POD", "BLOCK", "NODE"],
                [[x.handle, x.ip, x.kind, x.pod or "-", x.block, x.node or "-"] for x in report.leaks],
            )
        )
    if report.problems:
        parts.append(f"{len(report.problems)} inconsistenc(ies):")
        parts.append(table(["PROBLEM", "SUBJECT", "DETAIL"], [[p.kind, p.subject, p.detail] for p in report.problems]))
    return "\n\n".join(parts)


@ipam_group.command("check")
@output_option
@pass_ctl
@click.pass_context
def check_cmd(ctx: click.Context, ctl: CtlContext, output: str) -> None:
    """Find leaks (allocated, unused), endpoints without allocations, addresses held twice, empty handles.
    Exit status 1 when anything is found."""
    with _errors():
        report = check(ctl.client)
    if output == "json":
        emit(report.to_json(), [], [], "json")
    else:
        click.echo(_report_text(report))
    if not report.ok:
        ctx.exit(1)


def _holders(store: Store, ips: list[str], handle: str | None = None) -> list[m.Endpoint]:
    """The endpoints (live pod attachments) that use one of ``ips`` or name ``handle``."""
    addrs = {ipaddress.ip_address(ip) for ip in ips}
    endpoints = (v.value for v in store.list(k.ENDPOINTS_PREFIX, m.Endpoint))
    return [
        ep
        for ep in endpoints
        if (handle is not None and ep.handle == handle) or any(ipaddress.ip_interface(a).ip in addrs for a in ep.ips)
    ]


def _refuse_if_used(store: Store, what: str, ips: list[str], handle: str | None = None) -> None:
    holders = _holders(store, ips, handle)
    if holders:
        pods = ", ".join(f"{e.namespace}/{e.pod} (node {e.node}, {e.host_iface})" for e in holders)
        raise click.ClickException(f"{what} is in use by pod {pods}: not released (--force releases it anyway)")


@ipam_group.command("release")
@click.option("--ip", "ip", default=None, help="Release this address (refused while an endpoint uses it).")
@click.option("--handle", "handle", default=None, help="Release every address of this handle (idem).")
@click.option("--force", is_flag=True, help="Release even though a live endpoint uses the address.")
@pass_ctl
def release(ctl: CtlContext, ip: str | None, handle: str | None, force: bool) -> None:
    """Release an address or a handle (idempotent). An address a pod's endpoint still uses is not released without
    --force: the next pod would get it while the first still answers on it. (The check and the release are two
    steps: an endpoint written in between is not seen.)"""
    if (ip is None) == (handle is None):
        raise click.UsageError("give exactly one of --ip or --handle")
    with _errors():
        store = Store(ctl.client)
        ipam = Ipam(ctl.client)
        if ip is not None:
            ip = str(ipaddress.ip_address(ip))
            if not force:
                _refuse_if_used(store, ip, [ip])
            holder = ipam.release_ip(ip)
            click.echo(f"released {ip} (handle {holder})" if holder else f"{ip} was not allocated")
        else:
            assert handle is not None
            key = k.HandleKey(handle)
            key.path  # validates the name  # noqa: B018
            if not force:
                record = store.get(key, m.Handle)
                _refuse_if_used(store, f"handle {handle}", list(record.value.ips) if record else [], handle)
            ips = ipam.release_handle(handle)
            click.echo(f"released {', '.join(ips)} from {handle}" if ips else f"handle {handle} held nothing")


@ipam_group.command("gc")
@click.option("--grace", type=float, default=60.0, show_default=True, help="Seconds a leak must persist.")
@pass_ctl
def gc(ctl: CtlContext, grace: float) -> None:
    """Release leaked handles: looked at twice, ``--grace`` seconds apart."""
    with _errors():
        collector = LeakCollector(Ipam(ctl.client), grace=grace)
        released = collector.run_once()
        if grace > 0 and collector.first_seen:
            time.sleep(grace)
            released += collector.run_once()
    click.echo(f"released {len(released)} leaked handle(s){': ' + ', '.join(released) if released else ''}")
