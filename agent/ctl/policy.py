"""`agentctl policy explain|matrix|status`: NetworkPolicy as the agent enforces it.

Every answer comes from the same pure compiler the agent runs, over a snapshot read from etcd at one revision.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from agent.calc.policy import compile_policies
from agent.calc.policy.explain import DirectionResult, ExplainError, explain, matrix, parse_port, resolve_side
from agent.calc.policy.resolve import Compiled
from agent.calc.policy.spec import EGRESS, INGRESS
from agent.ctl.context import CtlContext, output_option, pass_ctl
from agent.ctl.output import emit
from agent.ctl.snapshot import load_snapshot


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except ExplainError as exc:
        raise click.ClickException(str(exc)) from None


def _compiled(ctl: CtlContext) -> Compiled:
    return compile_policies(load_snapshot(ctl.client))


@click.group("policy")
def policy_group() -> None:
    """NetworkPolicy: explain a connection or a pod, the reachability matrix, rejected policies."""


def _direction_line(d: DirectionResult | None, who: str) -> str:
    if d is None:
        return f"  {'':7} {who}: not a pod, not evaluated"
    name = d.direction.lower()
    if d.pending is not None:
        return f"  {name:7} {who}: {d.pending}"
    if not d.isolated:
        return f"  {name:7} {who}: not isolated (no policy selects it for {name})"
    head = f"  {name:7} {who}: isolated by {', '.join(d.policies)}"
    if d.matched:
        return f"{head}; allowed by {', '.join(d.matched)}"
    extra = f" (rejected, allowing nothing: {', '.join(d.rejected)})" if d.rejected else ""
    return f"{head}; no rule allows it{extra}"


def _pod_policies(c: Compiled, text: str) -> dict[str, Any]:
    """Which policies select the pod ``NS/POD``, per direction (what a connection explain shows for one side)."""
    ns, sep, name = text.partition("/")
    view = c.world.pods.get((ns, name)) if sep else None
    if view is None:
        raise ExplainError(f"no pod {text} (neither a pod record nor an endpoint)" if sep else f"{text!r}: not NS/POD")
    out: dict[str, Any] = {"pod": text, "node": view.node, "ips": list(view.ips), "pending": c.world.pending(view.key)}
    for direction in (INGRESS, EGRESS):
        pols = c.policies_for(view.key, direction)
        out[direction.lower()] = {
            "isolated": bool(pols) or out["pending"] is not None,
            "policies": [p.ident for p in pols],
            "rejected": {p.ident: p.error for p in pols if p.error is not None},
        }
    return out


def _pod_text(d: dict[str, Any]) -> list[str]:
    lines = [f"{d['pod']} on {d['node'] or '-'} ({', '.join(d['ips']) or 'no IPv4 address'})"]
    if d["pending"] is not None:
        return [*lines, f"  {d['pending']}"]
    for direction in ("ingress", "egress"):
        x = d[direction]
        if not x["policies"]:
            lines.append(f"  {direction:7} not isolated (no policy selects it for {direction})")
            continue
        lines.append(f"  {direction:7} isolated by {', '.join(x['policies'])}")
        lines += [f"  {'':7} {p} is rejected and allows nothing: {why}" for p, why in sorted(x["rejected"].items())]
    return lines


@policy_group.command("explain")
@click.option("--pod", default=None, help="NAMESPACE/POD: which policies select it, per direction.")
@click.option("--from", "src", default=None, help="NAMESPACE/POD or an IPv4 address.")
@click.option("--to", "dst", default=None, help="NAMESPACE/POD or an IPv4 address.")
@click.option("--port", default=None, help="PORT[/TCP|UDP|SCTP], e.g. 80/TCP.")
@output_option
@pass_ctl
def explain_cmd(  # noqa: PLR0917 - one parameter per click option
    ctl: CtlContext, pod: str | None, src: str | None, dst: str | None, port: str | None, output: str
) -> None:
    """Is a new connection FROM → TO on PORT allowed, and which policies and rules decide it. With --pod: which
    policies select that pod for ingress and for egress."""
    if pod is not None:
        if src or dst or port:
            raise click.UsageError("give either --pod, or --from, --to and --port")
        with _errors():
            d = _pod_policies(_compiled(ctl), pod)
        if output == "json":
            emit(d, [], [], "json")
        else:
            click.echo("\n".join(_pod_text(d)))
        return
    if not (src and dst and port):
        raise click.UsageError("give --from, --to and --port (or --pod NAMESPACE/POD)")
    with _errors():
        number, proto = parse_port(port)
        c = _compiled(ctl)
        v = explain(c, resolve_side(c, src), resolve_side(c, dst), proto, number)
    if output == "json":
        emit(v.to_json(), [], [], "json")
        return
    click.echo(f"{'ALLOWED' if v.allowed else 'DENIED'}: {v.src.text} -> {v.dst.text} {number}/{proto}")
    if v.egress is None and v.ingress is None:
        click.echo(f"  {v.reason}")
        return
    click.echo(_direction_line(v.egress, v.src.text) if v.egress else f"  egress  {v.src.text}: not a pod")
    click.echo(_direction_line(v.ingress, v.dst.text) if v.ingress else f"  ingress {v.dst.text}: not a pod")


@policy_group.command("matrix")
@click.option("--port", default="80/TCP", show_default=True, help="PORT[/TCP|UDP|SCTP].")
@click.option("-n", "--namespace", default=None, help="Only pods of this namespace.")
@click.option("--host", "hosts", multiple=True, help="Also this IPv4 address (e.g. an outside host), both ways.")
@output_option
@pass_ctl
def matrix_cmd(ctl: CtlContext, port: str, namespace: str | None, hosts: tuple[str, ...], output: str) -> None:
    """Reachability between all pods on PORT: rows are sources, columns destinations."""
    with _errors():
        number, proto = parse_port(port)
        for h in hosts:
            try:
                ipaddress.IPv4Address(h)
            except ValueError:
                raise ExplainError(f"--host {h!r}: not an IPv4 address") from None
        mx = matrix(_compiled(ctl), proto, number, namespace, tuple(hosts))
    names = mx.names()

    def cell(s: str, d: str) -> str:
        ok = mx.reaches(s, d)
        return "-" if ok is None else ("yes" if ok else "no")

    rows = [[s, *(cell(s, d) for d in names)] for s in names]
    emit(mx.to_json(), [f"FROM \\ TO ({number}/{proto})", *names], rows, output)


@policy_group.command("status")
@click.option("--all", "show_all", is_flag=True, help="List accepted policies too.")
@output_option
@pass_ctl
def status_cmd(ctl: CtlContext, show_all: bool, output: str) -> None:
    """Policies the compiler rejected, with the reason (including keys whose stored value cannot be read). A
    rejected policy still isolates the pods it selects in the directions it declares, allowing nothing: SELECTS
    says how many and which directions."""
    c = _compiled(ctl)
    keys = sorted(k for k, s in c.statuses.items() if show_all or not s.accepted)
    rows = []
    data = []
    for key in keys:
        st, cp = c.statuses[key], c.policies[key]
        selects = f"{len(cp.selected)} pods ({', '.join(cp.directions)})"
        rows.append([st.namespace, st.name, "accepted" if st.accepted else "rejected", selects, st.reason])
        data.append({**st.to_json(), "selectedPods": sorted(f"{ns}/{n}" for ns, n in cp.selected)})
    if output == "table" and not keys:
        n = len(c.statuses)
        click.echo(f"all {n} polic{'y' if n == 1 else 'ies'} accepted")
        return
    emit(data, ["NAMESPACE", "NAME", "STATUS", "SELECTS", "REASON"], rows, output)
