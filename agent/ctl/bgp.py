"""`agentctl status` (the node agent's readiness, policy and route sync, and its BGP peers, like `calicoctl node
status`) and `agentctl routes` (what each node's agent programmed). Both read the lease-bound status the agents
publish in etcd, so a dead agent shows as such."""

from __future__ import annotations

import ipaddress
from typing import Any

import click

from agent.ctl.context import CtlContext, output_option, pass_ctl
from agent.ctl.output import emit
from datastore import keys as k
from datastore import model as m
from datastore.store import Store


def _since(value: str) -> str:
    """``2026-11-23T01:02:03.456+00:00`` → ``2026-11-23 01:02:03`` (operators read seconds, not microseconds)."""
    return value.replace("T", " ")[:19] if value else ""


def _ip_order(ip: str) -> tuple[int, int]:
    addr = ipaddress.ip_address(ip)
    return addr.version, int(addr)


def _sync(mode_on: bool, revision: int | None, seen: int) -> str:
    """``revision 40 of 42``: the kernel reflects the datastore up to revision 40; the agent has seen 42."""
    if not mode_on:
        return "off"
    if revision is None:
        return "nothing applied yet"
    return f"revision {revision} of {seen}"


def _agent_lines(a: m.AgentStatus) -> list[str]:
    sync = f"datastore in sync (revision {a.revision})" if a.in_sync else "datastore NOT in sync"
    lines = [
        f"podnet agent on {a.node}: {sync}, since {_since(a.since)}",
        f"AS number {a.as_number or '-'}, router ID {a.router_id or '-'}",
    ]
    if a.ready is not None:  # a podnet-agent (a bare node runner reports none of this)
        lines.append("readiness: ready" if a.ready else "readiness: NOT ready: " + ("; ".join(a.not_ready) or "?"))
        lines.append(f"modes: {', '.join(a.modes) or 'none'}")
        lines.append(f"policy: {_sync('firewall' in a.modes, a.policy_revision, a.revision)}")
        lines.append(f"routes: {_sync('router' in a.modes, a.routes_revision, a.revision)}")
        if a.version:
            lines.append(f"version: {a.version}")
    lines.extend(f"rejected policy: {r}" for r in a.rejected_policies)
    lines.extend(f"problem: {p}" for p in a.problems)
    return lines


@click.command("status")
@click.option("--node", "node_opt", default=None, help="Show this node instead of the local one.")
@output_option
@pass_ctl
def status(ctl: CtlContext, node_opt: str | None, output: str) -> None:
    """The node agent's readiness, run modes, policy and route sync (the datastore revision the kernel reflects, of
    the one the agent has seen), rejected policies, and its BGP peers (address, type, state, since, info). Exit
    status 1 when the node has no running agent (its status is bound to the agent's lease)."""
    node = node_opt or ctl.node
    store = Store(ctl.client)
    agent = store.get(k.AgentStatusKey(node), m.AgentStatus)
    # Peers and routes are bound to the same lease as agents/<node>: with no agent there are none to show.
    peers = (
        []
        if agent is None
        else sorted(
            (v.value for v in store.list(k.bgp_status_prefix(node), m.BGPPeerStatus)),
            key=lambda p: _ip_order(p.peer_ip),
        )
    )
    data: dict[str, Any] = {
        "node": node,
        "running": agent is not None,
        "agent": None if agent is None else agent.value.to_json(),
        "peers": [p.to_json() for p in peers],
    }
    if output == "json":
        emit(data, [], [], "json")
    elif agent is None:
        click.echo(f"podnet agent on {node} is not running (no status in etcd: its lease has ended, or it never ran).")
    else:
        for line in _agent_lines(agent.value):
            click.echo(line)
        click.echo("")
        click.echo("BGP peers:")
        emit(
            None,
            ["PEER ADDRESS", "PEER TYPE", "STATE", "SINCE", "INFO"],
            [(p.peer_ip, p.peer_type, p.state, _since(p.since), p.info) for p in peers],
            "table",
        )
    if agent is None:
        raise click.exceptions.Exit(1)


@click.command("routes")
@click.option("--node", "node_opt", default=None, help="Only this node's routes (default: every node's).")
@output_option
@pass_ctl
def routes(ctl: CtlContext, node_opt: str | None, output: str) -> None:
    """The routes each node's agent programmed: destination, type, next hop, device, encapsulation, source peer."""
    prefix = k.routes_prefix(node_opt) if node_opt else k.ROUTES_PREFIX
    items = sorted(
        (v.value for v in Store(ctl.client).list(prefix, m.RouteStatus)),
        key=lambda r: (r.node, ipaddress.ip_network(r.cidr).version, ipaddress.ip_network(r.cidr)),
    )
    emit(
        [r.to_json() for r in items],
        ["NODE", "DESTINATION", "TYPE", "VIA", "DEV", "ENCAPSULATION", "LEARNED FROM"],
        [(r.node, r.cidr, r.type, r.via or "-", r.dev or "-", r.encapsulation, r.learned_from or "-") for r in items],
        output,
    )
