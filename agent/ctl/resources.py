"""`agentctl apply|delete -f` and `agentctl get` (etcd datastore mode): the objects an operator looks for."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from agent.calc.policy import compile_policies
from agent.calc.policy.selector import SelectorError, parse_selector
from agent.calc.snapshot import Snapshot
from agent.ctl.context import CtlContext, output_option, pass_ctl
from agent.ctl.manifest import Manifest, ManifestError, ident_of, kind_of, parse_manifests
from agent.ctl.output import emit
from agent.ctl.snapshot import load_snapshot
from datastore import codec
from datastore import keys as k
from datastore import model as m
from datastore.keys import InvalidKey
from datastore.store import Store


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except (ManifestError, InvalidKey) as exc:
        raise click.ClickException(str(exc)) from None


def _read(path: str) -> str:
    try:
        return sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"{path}: {getattr(exc, 'strerror', None) or exc}") from None


def _manifests(path: str, namespace: str, validate: bool) -> list[Manifest]:
    """The objects of a manifest file; an input without any is an error (a wrong path or an empty pipe)."""
    text = _read(path)
    with _errors():
        objects = parse_manifests(text, namespace, validate=validate)
    if not objects:
        where = "standard input" if path == "-" else path
        raise click.ClickException(f"no objects in {where}: it is empty or holds only empty documents")
    return objects


@click.command("apply")
@click.option("-f", "--filename", "path", required=True, help="A YAML/JSON manifest file, or - for stdin.")
@click.option("-n", "--namespace", default="default", show_default=True, help="For objects that name none.")
@pass_ctl
def apply_cmd(ctl: CtlContext, path: str, namespace: str) -> None:
    """Write NetworkPolicies, Namespaces and Pods from Kubernetes manifests into the datastore. Every document is
    checked first: an invalid one writes nothing."""
    objects = _manifests(path, namespace, validate=True)
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
    for obj in _manifests(path, namespace, validate=False):
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
    "nodes": "nodes",
    "node": "nodes",
    "no": "nodes",
    "endpoints": "endpoints",
    "endpoint": "endpoints",
    "workloadendpoints": "endpoints",
    "wep": "endpoints",
    "ep": "endpoints",
}


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f"{a}={b}" for a, b in sorted(labels.items())) or "<none>"


def _selector_text(raw: Any) -> str:
    try:
        return parse_selector(raw, "podSelector").text() or "<all>"
    except SelectorError:
        return "<invalid>"


Table = tuple[list[dict[str, Any]], list[str], list[list[Any]]]


def _namespaces(snap: Snapshot, namespace: str | None) -> Table:
    shown = [ns for _, ns in sorted(snap.namespaces.items()) if namespace in (None, ns.name)]
    return [ns.to_json() for ns in shown], ["NAME", "LABELS"], [[ns.name, _labels(ns.labels)] for ns in shown]


def _pods(snap: Snapshot, namespace: str | None, node: str | None) -> Table:
    shown = [p for (ns, _), p in sorted(snap.pods.items()) if namespace in (None, ns) and node in (None, p.node)]
    rows = [
        [
            p.namespace,
            p.name,
            ",".join(p.ips),
            p.node or "",
            _labels(p.labels),
            ",".join(f"{x.name}:{x.port}/{x.protocol}" for x in p.named_ports) or "<none>",
        ]
        for p in shown
    ]
    return [p.to_json() for p in shown], ["NAMESPACE", "NAME", "IPS", "NODE", "LABELS", "NAMED PORTS"], rows


def _policies(snap: Snapshot, namespace: str | None) -> Table:
    c = compile_policies(snap)  # its statuses include keys whose stored value cannot be read
    data: list[dict[str, Any]] = []
    rows: list[list[Any]] = []
    for key, st in sorted(c.statuses.items()):
        if namespace not in (None, key[0]):
            continue
        pol, cp = snap.policies.get(key), c.policies[key]
        if pol is None:
            sel, status = "<unreadable>", "unreadable"
            data.append({"namespace": key[0], "name": key[1], "status": st.to_json()})
        else:
            sel = _selector_text(pol.spec.get("podSelector") if isinstance(pol.spec, dict) else None)
            status = "accepted" if st.accepted else "rejected"
            data.append({**pol.to_json(), "status": st.to_json()})
        rows.append([key[0], key[1], sel, ",".join(cp.directions), status])
    return data, ["NAMESPACE", "NAME", "POD-SELECTOR", "POLICY-TYPES", "STATUS"], rows


def _nodes(store: Store, node: str | None) -> Table:
    shown = [v.value for v in store.list(k.NODES_PREFIX, m.Node) if node in (None, v.value.name)]
    rows = [
        [
            n.name,
            n.ip,
            n.as_number or "-",
            n.rr_cluster_id or "-",
            n.tunnel_address or "-",
            n.vxlan_address or "-",
            _labels(n.labels),
        ]
        for n in shown
    ]
    headers = ["NAME", "ADDRESS", "AS", "RR-CLUSTER-ID", "IPIP-TUNNEL", "VXLAN-TUNNEL", "LABELS"]
    return [n.to_json() for n in shown], headers, rows


def _endpoints(store: Store, namespace: str | None, node: str | None) -> Table:
    prefix = k.endpoints_prefix(node) if node else k.ENDPOINTS_PREFIX
    shown = [v.value for v in store.list(prefix, m.Endpoint) if namespace in (None, v.value.namespace)]
    rows = [
        [e.node, e.namespace, e.pod, e.iface, e.host_iface, ",".join(e.ips), e.mac or "-", (e.container_id or "-")[:12]]
        for e in shown
    ]
    headers = ["NODE", "NAMESPACE", "POD", "IFACE", "HOST-IFACE", "IPS", "MAC", "CONTAINER"]
    return [e.to_json() for e in shown], headers, rows


@click.command("get")
@click.argument("resource", type=click.Choice(sorted(RESOURCES), case_sensitive=False))
@click.option("-n", "--namespace", default=None, help="Only this namespace (default: all).")
@click.option("--node", "node", default=None, help="Only pods, endpoints or the node of this name (default: all).")
@output_option
@pass_ctl
def get_cmd(ctl: CtlContext, resource: str, namespace: str | None, node: str | None, output: str) -> None:
    """List policies, pods, namespaces, nodes or endpoints (the pods' network attachments) stored in the datastore."""
    what = RESOURCES[resource.lower()]
    with _errors():
        if what == "nodes":
            data, headers, rows = _nodes(Store(ctl.client), node)
        elif what == "endpoints":
            data, headers, rows = _endpoints(Store(ctl.client), namespace, node)
        else:
            snap = load_snapshot(ctl.client)
            if what == "namespaces":
                data, headers, rows = _namespaces(snap, namespace)
            elif what == "pods":
                data, headers, rows = _pods(snap, namespace, node)
            else:
                data, headers, rows = _policies(snap, namespace)
    emit(data, headers, rows, output)


COMMANDS = [apply_cmd, delete_cmd, get_cmd]
