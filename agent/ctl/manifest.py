"""Kubernetes manifests as users write them (YAML or JSON, several documents, ``List``) → podnet models.

Accepted: NetworkPolicy (``networking.k8s.io/v1``, and ``extensions/v1beta1`` / ``networking.k8s.io/v1beta1``
whose spec is the same), Namespace and Pod (``v1``: labels; a pod's IPs, node and named container ports). Every
document is checked before anything is written, so a bad file writes nothing; errors name the document and field.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from agent.calc.policy.spec import PolicyError, parse_spec
from datastore import codec
from datastore import model as m
from datastore.fields import ModelError
from datastore.keys import InvalidKey

POLICY_API_VERSIONS = ("networking.k8s.io/v1", "extensions/v1beta1", "networking.k8s.io/v1beta1")

Manifest = m.Policy | m.Namespace | m.Pod
# Kubernetes object names: DNS-1123 subdomain (namespaces: a DNS-1123 label).
_SUBDOMAIN = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class ManifestError(ValueError):
    """A document that cannot be applied; the message says which one and why."""


def _meta(doc: dict[str, Any], where: str, namespaced: bool, default_ns: str) -> tuple[str, str, dict[str, str]]:
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        raise ManifestError(f"{where}: metadata: required")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise ManifestError(f"{where}: metadata.name: required")
    ns = meta.get("namespace") or default_ns
    if not isinstance(ns, str):
        raise ManifestError(f"{where}: metadata.namespace: expected a string")
    if not _SUBDOMAIN.match(name) or (not namespaced and not _LABEL.match(name)):
        raise ManifestError(f"{where}: metadata.name: {name!r} is not a valid Kubernetes name (lower case, digits, -)")
    if namespaced and not _LABEL.match(ns):
        raise ManifestError(f"{where}: metadata.namespace: {ns!r} is not a valid namespace name")
    labels = meta.get("labels") or {}
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise ManifestError(f"{where}: metadata.labels: expected strings (quote numbers and booleans)")
    return (ns if namespaced else ""), name, dict(labels)


def _pod(doc: dict[str, Any], where: str, default_ns: str) -> m.Pod:
    ns, name, labels = _meta(doc, where, True, default_ns)
    spec = doc.get("spec") or {}
    status = doc.get("status") or {}
    if not isinstance(spec, dict) or not isinstance(status, dict):
        raise ManifestError(f"{where}: spec and status must be objects")
    ips = [x["ip"] for x in status.get("podIPs") or [] if isinstance(x, dict) and "ip" in x]
    if not ips and status.get("podIP"):
        ips = [status["podIP"]]
    ports = []
    for c, container in enumerate(spec.get("containers") or []):
        for p, port in enumerate((container or {}).get("ports") or []):
            if isinstance(port, dict) and port.get("name"):
                ports.append(
                    {"name": port["name"], "port": port.get("containerPort"), "protocol": port.get("protocol", "TCP")}
                )
            elif not isinstance(port, dict):
                raise ManifestError(f"{where}: spec.containers[{c}].ports[{p}]: expected an object")
    raw = {"namespace": ns, "name": name, "labels": labels, "ips": ips, "node": spec.get("nodeName")}
    raw["namedPorts"] = ports
    try:
        return m.Pod.from_json(raw)
    except ModelError as exc:
        raise ManifestError(f"{where}: {exc}") from None


def _policy(doc: dict[str, Any], where: str, default_ns: str, validate: bool) -> m.Policy:
    ns, name, _ = _meta(doc, where, True, default_ns)
    spec = doc.get("spec")
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise ManifestError(f"{where}: spec: expected an object")
    if validate:
        try:
            parse_spec(spec)
        except PolicyError as exc:
            raise ManifestError(f"{where}: NetworkPolicy {ns}/{name}: {exc}") from None
    return m.Policy(ns, name, spec)


def _document(doc: Any, where: str, default_ns: str, validate: bool) -> list[Manifest]:
    if not isinstance(doc, dict):
        raise ManifestError(f"{where}: expected a mapping, got {type(doc).__name__}")
    kind, api = doc.get("kind"), doc.get("apiVersion")
    if kind == "List":
        items = doc.get("items") or []
        if not isinstance(items, list):
            raise ManifestError(f"{where}: items: expected a list")
        return [x for i, item in enumerate(items) for x in _document(item, f"{where} item {i}", default_ns, validate)]
    if kind == "NetworkPolicy":
        if api not in POLICY_API_VERSIONS:
            raise ManifestError(
                f"{where}: NetworkPolicy apiVersion {api!r} is not one of {', '.join(POLICY_API_VERSIONS)}"
            )
        return [_policy(doc, where, default_ns, validate)]
    if kind in ("Namespace", "Pod"):
        if api != "v1":
            raise ManifestError(f"{where}: {kind} apiVersion must be v1, got {api!r}")
        if kind == "Pod":
            return [_pod(doc, where, default_ns)]
        _, name, labels = _meta(doc, where, False, default_ns)
        return [m.Namespace(name, labels)]
    raise ManifestError(f"{where}: kind {kind!r} is not supported (NetworkPolicy, Namespace, Pod, List)")


def parse_manifests(text: str, default_ns: str = "default", validate: bool = True) -> list[Manifest]:
    """Every object in ``text``, in order. Raises ``ManifestError`` on the first bad document."""
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise ManifestError(f"not valid YAML: {exc}") from None
    out: list[Manifest] = []
    for i, doc in enumerate(docs):
        if doc is None:  # an empty document between separators
            continue
        for obj in _document(doc, f"document {i + 1}", default_ns, validate):
            try:
                codec.key_of(obj).path  # noqa: B018 - renders the key, which validates names
            except InvalidKey as exc:
                raise ManifestError(f"document {i + 1}: {exc}") from None
            out.append(obj)
    return out


def kind_of(obj: Manifest) -> str:
    return {m.Policy: "networkpolicy", m.Namespace: "namespace", m.Pod: "pod"}[type(obj)]


def ident_of(obj: Manifest) -> str:
    return obj.name if isinstance(obj, m.Namespace) else f"{obj.namespace}/{obj.name}"
