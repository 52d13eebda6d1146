"""The agent's configuration: every option defined once (``OPTIONS``), resolved from five sources into one frozen
``AgentConfig``, with the source of each value.

Precedence, highest first: command-line flags > ``PODNET_*`` environment variables > the config file (YAML,
``/etc/podnet/agent.yaml`` or ``--config``) > the cluster config in etcd (``datastore.model.ClusterConfig``: only
the options it has, e.g. ``logLevel``) > defaults. ``resolve`` is pure: the daemon resolves once without the
cluster config (to know how to reach etcd), then again with it (and on SIGHUP, with the file read again).

One spelling per option, derived from its Python name so that the three cannot drift: ``sync_period`` is the flag
``--sync-period``, the variable ``PODNET_SYNC_PERIOD`` and the file key ``syncPeriod`` (lowerCamelCase, with the
initialisms IP, CA, TTL and CNI in capitals as Kubernetes writes them). The node name also comes from ``NODE_NAME``
(the downward API), after ``PODNET_NODE_NAME``, and else from the host name.

Unknown file keys and ``PODNET_*`` variables, and bad values, raise ``ConfigError`` naming the source.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from bgp.plan import Defaults as BgpDefaults
from bgp.speaker import BRIDGE_TIMEOUT, SpeakerConfig
from cni.main import DEFAULT_SOCKET as CNI_SOCKET
from daemon import autodetect
from daemon import config_values as v
from datastore import model as m
from datastore.etcd import DEFAULT_TIMEOUT as ETCD_TIMEOUT

DEFAULT_CONFIG_FILE = "/etc/podnet/agent.yaml"
ENV_PREFIX = "PODNET_"
NODE_NAME_ENV = "NODE_NAME"  # Kubernetes' downward API (spec.nodeName), as calico-node reads it
CONFIG_ENV = "PODNET_CONFIG"  # the config file's path (like --config); not an option
# PODNET_* variables that are not agent options and are left alone: other podnet programs' (the CNI plugin's
# fallback and client, tests, benchmarks, tox, the VM tier) and those Kubernetes adds for a Service named "podnet".
# Any other is refused, so that a misspelt option is not silently ignored (a unit test checks that every PODNET_*
# name in the repository is one or the other).
FOREIGN_ENV = re.compile(
    r"PODNET_(CONFIG|CNI_FALLBACK|CNI_CLIENT|TOP|UPDATE_GOLDEN|TEST_\w+|BENCH_\w+|TOX_\w+|VM_\w+"
    r"|SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT(_\d+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)?)"
)
_INITIALISMS = {"ip": "IP", "ca": "CA", "ttl": "TTL", "cni": "CNI"}


class ConfigError(ValueError):
    """A source holds an unknown option or a bad value; the message names the source."""


@dataclass(frozen=True)
class Option:
    name: str  # the AgentConfig field
    kind: v.Kind
    default: Any
    help: str
    group: str
    cluster: str | None = None  # the ClusterConfig attribute that sets it (below the file, above the default)
    default_text: str | None = None  # the docs' default when it is not a value (e.g. "the host name")

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def key(self) -> str:
        first, *rest = self.name.split("_")
        return first + "".join(_INITIALISMS.get(w, w.capitalize()) for w in rest)

    @property
    def metavar(self) -> str:
        if isinstance(self.kind, v.Choice):
            return "|".join(self.kind.choices)
        return self.kind.metavar


GENERAL, ETCD, MODES, TIMERS, HEALTH, LOGS, DATAPLANE, BGP = (
    "node", "etcd", "run modes", "timers", "health", "logs", "dataplane", "BGP",
)  # fmt: skip
_BGP = BgpDefaults()

OPTIONS: tuple[Option, ...] = (
    Option("node_name", v.NodeName(), None, "This node's name (the Kubernetes node name).", GENERAL,
           default_text="the host name (lowercase)"),
    Option("node_ip", v.NodeIP(), autodetect.parse_method(autodetect.FIRST_FOUND),
           "The node's IPv4 address, or how to find it: first-found, interface=REGEX, skip-interface=REGEX, "
           "can-reach=IP, cidr=CIDR (see docs/daemon-config.md).", GENERAL),
    Option("as_number", v.Integer(lo=1, hi=2**32 - 1, optional=True), None,
           "This node's BGP AS number (written to its node record); unset: the node record's, else the cluster's.",
           GENERAL, default_text="unset"),
    Option("etcd_endpoints", v.Endpoints(), ("127.0.0.1:2379",), "etcd endpoints, comma-separated.", ETCD),
    Option("etcd_ca_file", v.AbsolutePath(optional=True), None,
           "CA certificate that signs etcd's server certificates (TLS).", ETCD, default_text="unset"),
    Option("etcd_cert_file", v.AbsolutePath(optional=True), None,
           "Client certificate for etcd (TLS; with etcdKeyFile).", ETCD, default_text="unset"),
    Option("etcd_key_file", v.AbsolutePath(optional=True), None,
           "Client certificate's private key (with etcdCertFile).", ETCD, default_text="unset"),
    Option("etcd_timeout", v.Duration(), ETCD_TIMEOUT, "Deadline of each etcd request.", ETCD),
    Option("run_router", v.Bool(), True, "Run BGP and program routes and tunnel devices.", MODES),
    Option("run_firewall", v.Bool(), True, "Enforce NetworkPolicy (iptables and ipsets).", MODES),
    Option("run_cni", v.Bool(), True, "Serve the CNI plugin on the node's socket.", MODES),
    Option("sync_period", v.Duration(), 300.0, "Period of the full verify/resync pass.", TIMERS),
    Option("cache_sync_timeout", v.Duration(), 60.0,
           "Start-up fails if the datastore cannot be read within this time.", TIMERS),
    Option("status_ttl", v.Duration(lo=1, lo_open=False, whole=True), 20,
           "TTL of the lease that holds the agent's status keys.", TIMERS),
    Option("health_bind", v.HostPort(), v.BindAddress("127.0.0.1", 9099),
           "Address of /healthz, /readiness and /metrics (port 0: any free port).", HEALTH),
    Option("log_level", v.Choice(("debug", "info", "warning", "error")), "info", "podnet's log level.", LOGS,
           cluster="log_level"),
    Option("log_format", v.Choice(("text", "json")), "text", "One line per event, as text or JSON.", LOGS),
    Option("iptables_backend", v.Choice(("auto", "legacy", "nft")), "auto",
           "iptables backend; auto: the one kubelet's hint chain (else most rules) is in.", DATAPLANE),
    Option("cni_socket", v.AbsolutePath(), Path(CNI_SOCKET), "Unix socket of the CNI server.", DATAPLANE),
    Option("workdir", v.AbsolutePath(), Path("/run/podnet/agent"),
           "The agent's own files (ExaBGP config, bridge socket, logs).", DATAPLANE),
    Option("netns", v.OptionalText(describe="network namespace name", metavar="NAME"), None,
           "Program this network namespace (/run/netns/NAME) instead of our own: the lab and tests.", DATAPLANE,
           default_text="unset"),
    Option("bgp_hold_time", v.Duration(lo=0, lo_open=False, hi=65535, whole=True), _BGP.hold_time,
           "Hold time of sessions between podnet nodes (0, or at least 3s).", BGP),
    Option("bgp_graceful_restart_time", v.Duration(lo=0, lo_open=False, hi=4095, whole=True),
           _BGP.graceful_restart_time, "Graceful-restart time announced to peers (0: off).", BGP),
    Option("bgp_startup_grace", v.Duration(lo=0, lo_open=False), 30.0,
           "After start, keep learned routes this long for peers to come back.", BGP),
    Option("bgp_withdraw_on_exit", v.Bool(), False,
           "On SIGTERM tell peers we are gone (default: a planned restart, peers keep our routes).", BGP),
    Option("exabgp_bridge_timeout", v.Duration(), BRIDGE_TIMEOUT,
           "Restart ExaBGP when its API bridge has not connected for this long.", BGP),
    Option("exabgp_reactor_speed", v.Number(), SpeakerConfig.reactor_speed,
           "ExaBGP's reactor speed (it polls every speed/100 s when idle).", BGP),
    Option("exabgp_log_level", v.Choice(("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), upper=True), "INFO",
           "ExaBGP's own log level.", BGP),
)  # fmt: skip
BY_NAME = {o.name: o for o in OPTIONS}
BY_KEY = {o.key: o for o in OPTIONS}
BY_ENV = {o.env: o for o in OPTIONS}


def _d(name: str) -> Any:
    return BY_NAME[name].default


@dataclass(frozen=True)
class AgentConfig:
    """Every option the agent takes, typed; the defaults are the option table's. Durations are seconds."""

    node_name: str
    node_ip: autodetect.Method = field(default=_d("node_ip"))
    as_number: int | None = field(default=_d("as_number"))
    etcd_endpoints: tuple[str, ...] = field(default=_d("etcd_endpoints"))
    etcd_ca_file: Path | None = field(default=_d("etcd_ca_file"))
    etcd_cert_file: Path | None = field(default=_d("etcd_cert_file"))
    etcd_key_file: Path | None = field(default=_d("etcd_key_file"))
    etcd_timeout: float = field(default=_d("etcd_timeout"))
    run_router: bool = field(default=_d("run_router"))
    run_firewall: bool = field(default=_d("run_firewall"))
    run_cni: bool = field(default=_d("run_cni"))
    sync_period: float = field(default=_d("sync_period"))
    cache_sync_timeout: float = field(default=_d("cache_sync_timeout"))
    status_ttl: int = field(default=_d("status_ttl"))
    health_bind: v.BindAddress = field(default=_d("health_bind"))
    log_level: str = field(default=_d("log_level"))
    log_format: str = field(default=_d("log_format"))
    iptables_backend: str = field(default=_d("iptables_backend"))
    cni_socket: Path = field(default=_d("cni_socket"))
    workdir: Path = field(default=_d("workdir"))
    netns: str | None = field(default=_d("netns"))
    bgp_hold_time: int = field(default=_d("bgp_hold_time"))
    bgp_graceful_restart_time: int = field(default=_d("bgp_graceful_restart_time"))
    bgp_startup_grace: float = field(default=_d("bgp_startup_grace"))
    bgp_withdraw_on_exit: bool = field(default=_d("bgp_withdraw_on_exit"))
    exabgp_bridge_timeout: float = field(default=_d("exabgp_bridge_timeout"))
    exabgp_reactor_speed: float = field(default=_d("exabgp_reactor_speed"))
    exabgp_log_level: str = field(default=_d("exabgp_log_level"))

    @property
    def etcd_tls(self) -> bool:
        return self.etcd_cert_file is not None or self.etcd_ca_file is not None

    @property
    def bgp_defaults(self) -> BgpDefaults:
        return BgpDefaults(hold_time=self.bgp_hold_time, graceful_restart_time=self.bgp_graceful_restart_time)


# The dataclass and the option table describe the same fields, in the same order.
assert [f.name for f in dataclasses.fields(AgentConfig)] == [o.name for o in OPTIONS]


@dataclass(frozen=True)
class Source:
    """Where a value came from: ``kind`` is flag, environment, config file, cluster config, host name or default."""

    kind: str
    where: str = ""  # the flag, the variable, the file's path and key

    def __str__(self) -> str:
        return f"{self.kind} {self.where}" if self.where else self.kind


FLAG, ENVIRONMENT, FILE, CLUSTER, HOSTNAME, DEFAULT = (
    "flag", "environment", "config file", "cluster config", "host name", "default",
)  # fmt: skip


class Resolved(NamedTuple):
    config: AgentConfig
    sources: dict[str, Source]  # option name -> where its value came from


def parse_file(text: str | None, path: str = DEFAULT_CONFIG_FILE) -> dict[str, Any]:
    """The config file's settings (file key -> YAML value; a key without a value counts as unset); unknown keys
    and a malformed file are errors."""
    if text is None:
        return {}
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of options, found {type(data).__name__}")
    for key in data:
        if not isinstance(key, str) or key not in BY_KEY:
            hint = v.suggest(str(key), list(BY_KEY))
            did = f" (did you mean {hint!r}?)" if hint else ""
            raise ConfigError(f"config file {path}: unknown key {key!r}{did}")
    return {key: value for key, value in data.items() if value is not None}  # "key:" with no value: unset


def check_env(env: Mapping[str, str]) -> None:
    """Every ``PODNET_*`` variable is an option (or one of ``FOREIGN_ENV``): a misspelt one is not ignored."""
    for name in sorted(env):
        if name.startswith(ENV_PREFIX) and name not in BY_ENV and not FOREIGN_ENV.fullmatch(name):
            hint = v.suggest(name, list(BY_ENV))
            did = f" (did you mean {hint}?)" if hint else ""
            raise ConfigError(f"environment {name}: not a podnet-agent option{did}")


def _parse(option: Option, raw: object, source: Source) -> Any:
    try:
        return option.kind.parse(raw)
    except ValueError as exc:
        where = f"{source}: {option.key}" if source.kind == FILE else str(source)
        raise ConfigError(f"{where}: {exc}") from None


def resolve(
    flags: Mapping[str, object],
    env: Mapping[str, str],
    file_text: str | None,
    cluster: m.ClusterConfig | None = None,
    *,
    file_path: str = DEFAULT_CONFIG_FILE,
    hostname: str | None = None,
) -> Resolved:
    """The effective configuration and the source of each value.

    ``flags``: option name -> value for the flags given (``config_cli.flags_of`` makes it from argparse);
    ``env``: the process environment (an empty variable counts as unset); ``file_text``: the config file's
    content (None: no file); ``cluster``: the cluster config read from etcd (None: not read yet);
    ``hostname``: the machine's (read when needed and not given).
    """
    for name in flags:
        if name not in BY_NAME:
            raise ValueError(f"not an option: {name!r}")
    check_env(env)
    in_file = parse_file(file_text, file_path)
    values: dict[str, Any] = {}
    sources: dict[str, Source] = {}
    for option in OPTIONS:
        candidates: list[tuple[Source, object]] = []
        if option.name in flags:
            candidates.append((Source(FLAG, option.flag), flags[option.name]))
        if env.get(option.env, "").strip():
            candidates.append((Source(ENVIRONMENT, option.env), env[option.env]))
        if option.name == "node_name" and env.get(NODE_NAME_ENV, "").strip():
            candidates.append((Source(ENVIRONMENT, NODE_NAME_ENV), env[NODE_NAME_ENV]))
        if option.key in in_file:
            candidates.append((Source(FILE, file_path), in_file[option.key]))
        if option.cluster is not None and cluster is not None:
            candidates.append((Source(CLUSTER, option.key), getattr(cluster, option.cluster)))
        if candidates:
            source, raw = candidates[0]
            values[option.name] = _parse(option, raw, source)
        elif option.name == "node_name":
            source = Source(HOSTNAME)
            values[option.name] = _node_name_from_host(hostname)
        else:
            source = Source(DEFAULT)
            values[option.name] = option.default
        sources[option.name] = source
    config = AgentConfig(**values)
    _check(config, sources)
    return Resolved(config, sources)


def _node_name_from_host(hostname: str | None) -> str:
    if hostname is None:
        import socket  # the one read of the machine, only when no source names the node

        hostname = socket.gethostname()
    try:
        return v.NodeName().parse(hostname.lower())
    except ValueError as exc:
        raise ConfigError(f"host name: {exc}; set --node-name or {NODE_NAME_ENV}") from None


def _check(config: AgentConfig, sources: Mapping[str, Source]) -> None:
    """Rules between options."""

    def named(name: str) -> str:
        return f"{BY_NAME[name].key} ({sources[name]})"

    if (config.etcd_cert_file is None) != (config.etcd_key_file is None):
        given, missing = ("etcd_cert_file", "etcd_key_file")[:: 1 if config.etcd_key_file is None else -1]
        raise ConfigError(f"{named(given)} is set but {BY_NAME[missing].key} is not: the two go together")
    if config.etcd_tls:
        plain = [e for e in config.etcd_endpoints if e.startswith("http://")]
        if plain:
            raise ConfigError(
                f"{named('etcd_endpoints')}: {plain[0]} is plain HTTP, but TLS files are set "
                f"({named('etcd_ca_file' if config.etcd_ca_file else 'etcd_cert_file')})"
            )
    if 0 < config.bgp_hold_time < 3:
        raise ConfigError(f"{named('bgp_hold_time')}: must be 0 or at least 3s (RFC 4271)")


# -- showing the effective configuration -----------------------------------------------------------------------


def as_json(resolved: Resolved) -> dict[str, dict[str, Any]]:
    """``{fileKey: {"value": …, "source": "…"}}`` in option order; durations in seconds, as the file takes them."""
    config, sources = resolved
    return {o.key: {"value": o.kind.to_json(getattr(config, o.name)), "source": str(sources[o.name])} for o in OPTIONS}


def render(resolved: Resolved, output: str = "text") -> str:
    """The effective configuration with the source of each value: an aligned table, or JSON (``output="json"``)."""
    if output == "json":
        return json.dumps(as_json(resolved), indent=2) + "\n"
    if output != "text":
        raise ValueError(f"output must be text or json, not {output!r}")
    config, sources = resolved
    rows = [("OPTION", "VALUE", "SOURCE")]
    rows += [(o.key, o.kind.show(getattr(config, o.name)) or "-", str(sources[o.name])) for o in OPTIONS]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    return "".join(f"{a:<{w0}}  {b:<{w1}}  {c}".rstrip() + "\n" for a, b, c in rows)


def log_lines(resolved: Resolved) -> list[str]:
    """One ``key=value (source)`` line per option, for the start-up log."""
    config, sources = resolved
    return [f"{o.key}={o.kind.show(getattr(config, o.name)) or '-'} ({sources[o.name]})" for o in OPTIONS]


def default_text(option: Option) -> str:
    if option.default_text is not None:
        return option.default_text
    return option.kind.show(option.default)
