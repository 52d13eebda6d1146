"""`agentctl policy explain|matrix|status`, `agentctl apply|delete -f` and `agentctl get` (etcd datastore mode).

Every answer comes from the same pure compiler the agent runs, over a snapshot read from etcd at one revision.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click

from agent.calc.policy import compile_policies
from agent.calc.policy.explain import DirectionResult, ExplainError, explain, matrix, parse_port, resolve_side
from agent.calc.policy.resolve import Compiled
from agent.calc.policy.selector import SelectorError, parse_selector
from agent.calc.snapshot import Snapshot
from agent.ctl.context import CtlContext, output_option, pass_ctl
from agent.ctl.manifest import ManifestError, ident_of, kind_of, parse_manifests
from agent.ctl.output import emit
from datastore import codec
from datastore import keys as k
from datastore import model as m
from datastore.errors import DatastoreError
from datastore.etcd import EtcdClient
from datastore.store import Store

T = TypeVar("T")


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except (ExplainError, ManifestError) as exc:
        raise click.ClickException(str(exc)) from None
    except DatastoreError as exc:
        raise click.ClickException(f"datastore: {exc}") from None


def load_snapshot(client: EtcdClient) -> Snapshot:
    """Pods, namespaces, policies, endpoints and nodes, all read at one etcd revision."""
    store = Store(client)
    rev = client.revision()

    def listed(prefix: str, cls: type[T]) -> list[T]:
        return [v.value for v in store.list(prefix, cls, rev)]

    return Snapshot(
        revision=rev,
        in_sync=True,
        nodes={n.name: n for n in listed(k.NODES_PREFIX, m.Node)},
        pods={(p.namespace, p.name): p for p in listed(k.PODS_PREFIX, m.Pod)},
        namespaces={n.name: n for n in listed(k.NAMESPACES_PREFIX, m.Namespace)},
        policies={(p.namespace, p.name): p for p in listed(k.POLICIES_PREFIX, m.Policy)},
        endpoints={(e.node, e.namespace, e.pod, e.iface): e for e in listed(k.ENDPOINTS_PREFIX, m.Endpoint)},
    )


def _compiled(ctl: CtlContext) -> Compiled:
    return compile_policies(load_snapshot(ctl.client))


# --- agentctl policy ---------------------------------------------------------------------------------------------


@click.group("policy")
def policy_group() -> None:
    """NetworkPolicy: explain a connection, the reachability matrix, rejected policies."""


def _direction_line(d: DirectionResult | None, who: str) -> str:
    if d is None:
        return f"  {'':7} {who}: not a pod, not evaluated"
    name = d.direction.lower()
    if not d.isolated:
        return f"  {name:7} {who}: not isolated (no policy selects it for {name})"
    head = f"  {name:7} {who}: isolated by {', '.join(d.policies)}"
    if d.matched:
        return f"{head}; allowed by {', '.join(d.matched)}"
    extra = f" (rejected, allowing nothing: {', '.join(d.rejected)})" if d.rejected else ""
    return f"{head}; no rule allows it{extra}"


@policy_group.command("explain")
@click.option("--from", "src", required=True, help="NAMESPACE/POD or an IPv4 address.")
@click.option("--to", "dst", required=True, help="NAMESPACE/POD or an IPv4 address.")
@click.option("--port", required=True, help="PORT[/TCP|UDP|SCTP], e.g. 80/TCP.")
@output_option
@pass_ctl
def explain_cmd(ctl: CtlContext, src: str, dst: str, port: str, output: str) -> None:
    """Is a new connection FROM → TO on PORT allowed, and which policies and rules decide it."""
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
    """Policies the compiler rejected, with the reason. A rejected policy still isolates the pods it selects in the
    directions it declares, allowing nothing: SELECTS says how many and which directions."""
    with _errors():
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


# --- agentctl apply / get ----------------------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        return sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"{path}: {getattr(exc, 'strerror', None) or exc}") from None


@click.command("apply")
@click.option("-f", "--filename", "path", required=True, help="A YAML/JSON manifest file, or - for stdin.")
@click.option("-n", "--namespace", default="default", show_default=True, help="For objects that name none.")
@pass_ctl
def apply_cmd(ctl: CtlContext, path: str, namespace: str) -> None:
    """Write NetworkPolicies, Namespaces and Pods from Kubernetes manifests into the datastore. Every document is
    checked first: an invalid one writes nothing."""
    text = _read(path)
    with _errors():
        objects = parse_manifests(text, namespace)
        store = Store(ctl.client)
        for obj in objects:
            current = store.get(codec.key_of(obj), type(obj))
            if current is not None and current.value == obj:
                verb = "unchanged"
            else:
                store.put(obj)
                verb = "created" if current is None else "configured"
            click.echo(f"{kind_of(obj)} {ident_of(obj)} {verb}")


@click.command("delete")
@click.option("-f", "--filename", "path", required=True, help="A YAML/JSON manifest file, or - for stdin.")
@click.option("-n", "--namespace", default="default", show_default=True, help="For objects that name none.")
@pass_ctl
def delete_cmd(ctl: CtlContext, path: str, namespace: str) -> None:
    """Delete the objects a manifest names (only their identity is read, so an invalid policy can be deleted)."""
    text = _read(path)
    with _errors():
        objects = parse_manifests(text, namespace, validate=False)
        for obj in objects:
            gone = ctl.client.delete(codec.key_of(obj).path)
            click.echo(f"{kind_of(obj)} {ident_of(obj)} {'deleted' if gone else 'not found'}")


RESOURCES = {
    "policies": "policies",
    "policy": "policies",
    "networkpolicies": "policies",
    "networkpolicy": "policies",
    "netpol": "policies",
    "pods": "pods",
    "pod": "pods",
    "po": "pods",
    "namespaces": "namespaces",
    "namespace": "namespaces",
    "ns": "namespaces",
}


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f"{a}={b}" for a, b in sorted(labels.items())) or "<none>"


@click.command("get")
@click.argument("resource", type=click.Choice(sorted(RESOURCES), case_sensitive=False))
@click.option("-n", "--namespace", default=None, help="Only this namespace (default: all).")
@output_option
@pass_ctl
def get_cmd(ctl: CtlContext, resource: str, namespace: str | None, output: str) -> None:
    """List policies, pods or namespaces stored in the datastore."""
    what = RESOURCES[resource.lower()]
    with _errors():
        snap = load_snapshot(ctl.client)
        rows: list[list[Any]] = []
        data: list[dict[str, Any]] = []
        if what == "namespaces":
            for ns in sorted(snap.namespaces.values(), key=lambda x: x.name):
                if namespace in (None, ns.name):
                    rows.append([ns.name, _labels(ns.labels)])
                    data.append(ns.to_json())
            emit(data, ["NAME", "LABELS"], rows, output)
        elif what == "pods":
            for (ns_name, _), pod in sorted(snap.pods.items()):
                if namespace in (None, ns_name):
                    ports = ",".join(f"{p.name}:{p.port}/{p.protocol}" for p in pod.named_ports) or "<none>"
                    rows.append(
                        [pod.namespace, pod.name, ",".join(pod.ips), pod.node or "", _labels(pod.labels), ports]
                    )
                    data.append(pod.to_json())
            emit(data, ["NAMESPACE", "NAME", "IPS", "NODE", "LABELS", "NAMED PORTS"], rows, output)
        else:
            c = compile_policies(snap)
            for key, pol in sorted(snap.policies.items()):
                if namespace in (None, key[0]):
                    st = c.statuses[key]
                    cp = c.policies[key]
                    sel = pol.spec.get("podSelector") if isinstance(pol.spec, dict) else None
                    rows.append(
                        [
                            pol.namespace,
                            pol.name,
                            _selector_text(sel),
                            ",".join(cp.directions),
                            "accepted" if st.accepted else "rejected",
                        ]
                    )
                    data.append({**pol.to_json(), "status": st.to_json()})
            emit(data, ["NAMESPACE", "NAME", "POD-SELECTOR", "POLICY-TYPES", "STATUS"], rows, output)


def _selector_text(raw: Any) -> str:
    try:
        return parse_selector(raw, "podSelector").text() or "<all>"
    except SelectorError:
        return "<invalid>"


COMMANDS = [policy_group, apply_cmd, delete_cmd, get_cmd]
