"""The plugin's inputs: CNI_* environment and the network configuration on stdin, validated into typed values.

Every problem is a ``CniError`` with the spec's code: a missing or malformed variable is 4, stdin that is not a JSON
object is 6, a bad field is 7, an unsupported cniVersion is 1.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cni.errors import DECODE_FAILURE, INCOMPATIBLE_VERSION, INVALID_CONFIG, INVALID_ENV, CniError

SUPPORTED_VERSIONS = ("0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION = "1.1.0"
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")
DEFAULT_MTU = 1450  # 1500 minus VXLAN's 50 bytes
_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_IFNAME_BAD = re.compile(r"[/:\s%]")


@dataclass(frozen=True)
class NetConf:
    cni_version: str
    name: str
    etcd_endpoints: tuple[str, ...]
    node_name: str
    mtu: int = DEFAULT_MTU
    pool: str | None = None
    runtime_ips: tuple[str, ...] = ()  # the "ips" capability
    valid_attachments: tuple[tuple[str, str], ...] | None = None  # GC: (containerID, ifname)
    host_netns: str | None = None  # the node's network namespace when it is not the plugin's own (test bed, lab)
    etcd_ca_file: str | None = None  # etcd TLS (None: the server's own setting, else plain)
    etcd_cert_file: str | None = None
    etcd_key_file: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class CniEnv:
    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: Mapping[str, str] = field(default_factory=dict)

    @property
    def pod_namespace(self) -> str:
        return self.args.get("K8S_POD_NAMESPACE") or "cni"

    @property
    def pod_name(self) -> str:
        return self.args.get("K8S_POD_NAME") or self.container_id

    @property
    def requested_ip(self) -> str | None:
        return self.args.get("IP") or None


def parse_env(env: Mapping[str, str]) -> CniEnv:
    command = env.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CniError(INVALID_ENV, "CNI_COMMAND is missing or unknown", f"CNI_COMMAND={command!r}")
    if command in ("VERSION", "STATUS", "GC"):
        return CniEnv(command)
    cid = env.get("CNI_CONTAINERID", "")
    if not _CONTAINER_ID.match(cid):
        raise CniError(INVALID_ENV, "CNI_CONTAINERID is missing or malformed", f"CNI_CONTAINERID={cid!r}")
    ifname = env.get("CNI_IFNAME", "")
    if not ifname or len(ifname) > 15 or _IFNAME_BAD.search(ifname) or ifname in (".", ".."):
        raise CniError(INVALID_ENV, "CNI_IFNAME is missing or not a valid interface name", f"CNI_IFNAME={ifname!r}")
    netns = env.get("CNI_NETNS", "")
    if command in ("ADD", "CHECK") and not netns.startswith("/"):
        raise CniError(INVALID_ENV, "CNI_NETNS must be the path of the container's network namespace", f"{netns!r}")
    return CniEnv(command, cid, netns, ifname, parse_args(env.get("CNI_ARGS", "")))


def parse_args(raw: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in filter(None, raw.split(";")):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise CniError(INVALID_ENV, "CNI_ARGS is malformed", f"{part!r} is not KEY=VALUE")
        out[key] = value
    ip = out.get("IP")
    if ip:
        try:
            out["IP"] = str(ipaddress.IPv4Address(ip.split("/")[0]))
        except ValueError:
            raise CniError(INVALID_ENV, "CNI_ARGS: IP is not an IPv4 address", f"IP={ip!r}") from None
    return out


def decode(stdin: bytes) -> dict[str, Any]:
    try:
        data = json.loads(stdin)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CniError(DECODE_FAILURE, "network configuration on stdin is not JSON", str(exc)) from None
    if not isinstance(data, dict):
        raise CniError(DECODE_FAILURE, "network configuration on stdin is not a JSON object")
    return data


def version_of(data: Mapping[str, Any]) -> str:
    version = data.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise CniError(INVALID_CONFIG, "cniVersion is missing")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            INCOMPATIBLE_VERSION,
            f"cniVersion {version} is not supported",
            f"supported: {', '.join(SUPPORTED_VERSIONS)}",
        )
    return version


def _str_field(data: Mapping[str, Any], name: str, default: str | None = None) -> str | None:
    value = data.get(name, default)
    if value is not None and (not isinstance(value, str) or not value):
        raise CniError(INVALID_CONFIG, f"{name} must be a non-empty string")
    return value


def parse_conf(data: Mapping[str, Any], env: Mapping[str, str]) -> NetConf:
    version = version_of(data)
    name = _str_field(data, "name")
    if name is None:
        raise CniError(INVALID_CONFIG, "name is missing")
    raw_eps = data.get("etcdEndpoints", env.get("PODNET_ETCD_ENDPOINTS"))
    if isinstance(raw_eps, str):
        raw_eps = [e.strip() for e in raw_eps.split(",") if e.strip()]
    if not isinstance(raw_eps, list) or not raw_eps or not all(isinstance(e, str) and e for e in raw_eps):
        raise CniError(INVALID_CONFIG, "etcdEndpoints must be a non-empty list of host:port strings")
    node = _str_field(data, "nodeName") or env.get("PODNET_NODE_NAME") or socket.gethostname()
    mtu = data.get("mtu", DEFAULT_MTU)
    if isinstance(mtu, bool) or not isinstance(mtu, int) or not 68 <= mtu <= 65535:
        raise CniError(INVALID_CONFIG, f"mtu must be an integer from 68 to 65535, got {mtu!r}")
    pool = _str_field(data, "pool")
    if pool is not None:
        try:
            pool = str(ipaddress.IPv4Network(pool))
        except ValueError as exc:
            raise CniError(INVALID_CONFIG, f"pool {pool!r} is not an IPv4 CIDR: {exc}") from None
    runtime = data.get("runtimeConfig") or {}
    if not isinstance(runtime, dict):
        raise CniError(INVALID_CONFIG, "runtimeConfig must be an object")
    ips: list[str] = []
    for item in runtime.get("ips") or []:
        try:
            ips.append(str(ipaddress.IPv4Interface(item).ip))
        except (ValueError, TypeError):
            raise CniError(INVALID_CONFIG, f"runtimeConfig.ips: {item!r} is not an IPv4 address") from None
    attachments: tuple[tuple[str, str], ...] | None = None
    if "cni.dev/valid-attachments" in data:
        raw_att = data["cni.dev/valid-attachments"]
        if not isinstance(raw_att, list) or not all(
            isinstance(a, dict) and isinstance(a.get("containerID"), str) and isinstance(a.get("ifname"), str)
            for a in raw_att
        ):
            raise CniError(INVALID_CONFIG, "cni.dev/valid-attachments must be a list of {containerID, ifname}")
        attachments = tuple((a["containerID"], a["ifname"]) for a in raw_att)
    host_netns = _str_field(data, "hostNetns")
    if host_netns is not None and not host_netns.startswith("/"):
        raise CniError(INVALID_CONFIG, f"hostNetns must be a path, got {host_netns!r}")
    tls = _etcd_tls(data, env)
    return NetConf(
        cni_version=version,
        name=name,
        etcd_endpoints=tuple(raw_eps),
        node_name=node,
        mtu=mtu,
        pool=pool,
        runtime_ips=tuple(ips),
        valid_attachments=attachments,
        host_netns=host_netns,
        etcd_ca_file=tls[0],
        etcd_cert_file=tls[1],
        etcd_key_file=tls[2],
        raw=data,
    )


# The conflist's etcd TLS keys, spelled as the agent's config file spells them, and the variables they fall back to.
ETCD_TLS_FIELDS = (("etcdCAFile", "PODNET_ETCD_CA_FILE"), ("etcdCertFile", "PODNET_ETCD_CERT_FILE"),
                   ("etcdKeyFile", "PODNET_ETCD_KEY_FILE"))  # fmt: skip


def _etcd_tls(data: Mapping[str, Any], env: Mapping[str, str]) -> tuple[str | None, str | None, str | None]:
    """(CA, certificate, key) files: the network configuration's, else the caller's ``PODNET_ETCD_*`` variables."""
    files: list[str | None] = []
    for key, variable in ETCD_TLS_FIELDS:
        value = _str_field(data, key) or env.get(variable) or None
        if value is not None and not value.startswith("/"):
            raise CniError(INVALID_CONFIG, f"{key} must be an absolute path, got {value!r}")
        files.append(value)
    ca, cert, key_file = files
    if (cert is None) != (key_file is None):
        raise CniError(INVALID_CONFIG, "etcdCertFile and etcdKeyFile go together: give both or neither")
    return ca, cert, key_file
