"""A lab scenario: the cluster's nodes, namespaces and pods, and phases of policy changes, each followed by a
reachability check on some ports. Read from YAML; validated here so a bad file fails before anything starts."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT = Path(__file__).resolve().parent / "scenarios" / "seed.yaml"
_PORT = re.compile(r"^(\d{1,5})/(TCP|UDP)$")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# The outside host lives in a documentation range (RFC 5737): never a real public address.
OUTSIDE_RANGES = tuple(ipaddress.IPv4Network(n) for n in ("198.51.100.0/24", "192.0.2.0/24", "203.0.113.0/24"))


class ScenarioError(ValueError):
    pass


@dataclass(frozen=True)
class PodSpec:
    namespace: str
    name: str
    node: str
    labels: dict[str, str]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Phase:
    name: str
    apply: str = ""  # manifests for `agentctl apply -f -`
    delete: tuple[str, ...] = ()  # NAMESPACE/NAME of policies for `agentctl delete`
    ports: tuple[tuple[int, str], ...] = ((80, "TCP"),)


@dataclass(frozen=True)
class Scenario:
    name: str
    nodes: tuple[str, ...]
    encapsulation: str
    namespaces: dict[str, dict[str, str]]
    pods: tuple[PodSpec, ...]
    phases: tuple[Phase, ...] = field(default=())
    outside: str | None = None  # an outside host's address, reached through the underlay's router

    def ports(self) -> list[tuple[int, str]]:
        return sorted({p for ph in self.phases for p in ph.ports})


def _str_map(v: Any, what: str) -> dict[str, str]:
    if v is None:
        return {}
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        raise ScenarioError(f"{what}: expected a mapping of strings")
    return dict(v)


def _port(text: Any, where: str) -> tuple[int, str]:
    m = _PORT.match(str(text).upper())
    if m is None or not 1 <= int(m.group(1)) <= 65535:
        raise ScenarioError(f"{where}: port {text!r} is not PORT/TCP or PORT/UDP")
    return int(m.group(1)), m.group(2)


def parse(text: str, *, encapsulation: str | None = None) -> Scenario:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ScenarioError(f"not YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ScenarioError("a scenario is a mapping with nodes, namespaces, pods and phases")
    nodes = doc.get("nodes")
    if not isinstance(nodes, list) or not nodes or not all(isinstance(n, str) and _NAME.match(n) for n in nodes):
        raise ScenarioError("nodes: a list of node names (lower-case letters, digits, '-')")
    if len(nodes) > 50:
        raise ScenarioError("nodes: at most 50")
    encap = encapsulation or str(doc.get("encapsulation", "vxlan"))
    if encap not in ("vxlan", "none"):
        raise ScenarioError(f"encapsulation {encap!r}: vxlan or none (this kernel has no IPIP)")
    raw_ns = doc.get("namespaces") or {}
    if not isinstance(raw_ns, dict):
        raise ScenarioError("namespaces: a mapping of namespace -> labels")
    namespaces = {str(k): _str_map(v, f"namespaces.{k}") for k, v in raw_ns.items()}
    pods = []
    for i, p in enumerate(doc.get("pods") or []):
        if not isinstance(p, dict) or not isinstance(p.get("name"), str) or "/" not in p["name"]:
            raise ScenarioError(f"pods[{i}]: needs name: NAMESPACE/POD")
        ns, name = p["name"].split("/", 1)
        if p.get("node") not in nodes:
            raise ScenarioError(f"pods[{i}] ({p['name']}): node {p.get('node')!r} is not one of {nodes}")
        namespaces.setdefault(ns, {})
        pods.append(PodSpec(ns, name, p["node"], _str_map(p.get("labels"), f"pods[{i}].labels")))
    if not pods:
        raise ScenarioError("pods: at least one pod")
    if len({p.key for p in pods}) != len(pods):
        raise ScenarioError("pods: a name appears twice")
    phases = []
    for i, ph in enumerate(doc.get("phases") or [{"name": "no policy"}]):
        if not isinstance(ph, dict) or not isinstance(ph.get("name"), str):
            raise ScenarioError(f"phases[{i}]: needs a name")
        ports = tuple(_port(x, f"phases[{i}]") for x in ph.get("ports", ["80/TCP"]))
        delete = tuple(str(x) for x in ph.get("delete") or [])
        if any(x.count("/") != 1 for x in delete):
            raise ScenarioError(f"phases[{i}].delete: NAMESPACE/NAME of policies")
        phases.append(Phase(ph["name"], str(ph.get("apply") or ""), delete, ports or ((80, "TCP"),)))
    outside = doc.get("outside")
    if outside is not None:
        try:
            addr = ipaddress.IPv4Address(str(outside))
        except ValueError:
            raise ScenarioError(f"outside: {outside!r} is not an IPv4 address") from None
        net = next((n for n in OUTSIDE_RANGES if addr in n), None)
        if net is None or addr in (net.network_address, net.network_address + 1, net.broadcast_address):
            raise ScenarioError(f"outside: {outside} must be a host in 198.51.100.0/24, 192.0.2.0/24 or 203.0.113.0/24")
        outside = str(addr)
    return Scenario(str(doc.get("name", "lab")), tuple(nodes), encap, namespaces, tuple(pods), tuple(phases), outside)


def load(path: Path | None, *, encapsulation: str | None = None) -> Scenario:
    source = path or DEFAULT
    try:
        text = source.read_text()
    except OSError as exc:
        raise ScenarioError(f"{source}: {exc.strerror}") from None
    try:
        return parse(text, encapsulation=encapsulation)
    except ScenarioError as exc:
        raise ScenarioError(f"{source}: {exc}") from None
