"""The CNI commands. ``run(env, stdin)`` is the whole plugin as a function: the same code runs in a one-shot
process and in the long-running server (``cni.server``), which is why it never reads ``os.environ`` itself.

ADD either completes (address allocated, veth pair configured, endpoint in etcd, result printed) or undoes every
step it took, in reverse, before reporting the error: nothing half-created is left behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cni import link
from cni.config import LATEST_VERSION, SUPPORTED_VERSIONS, CniEnv, NetConf, decode, parse_conf, parse_env
from cni.errors import (
    CHECK_FAILED,
    INTERFACE_FAILURE,
    INTERNAL,
    INVALID_CONFIG,
    IPAM_FAILURE,
    NOT_AVAILABLE,
    TRY_AGAIN_LATER,
    CniError,
)
from datastore import keys as k
from datastore import model as m
from datastore.errors import CasConflict, DatastoreError, Unavailable
from datastore.etcd import EtcdClient, EtcdTLS
from datastore.keys import InvalidKey
from datastore.store import Store
from ipam.allocator import Ipam, pod_handle
from ipam.batch import GroupAllocator
from ipam.errors import AddressInUse, InvalidRequest, IpamError, TooManyConflicts

log = logging.getLogger(__name__)
DEFAULT_ETCD_TIMEOUT = 10.0  # seconds per etcd request


@dataclass(frozen=True)
class Outcome:
    code: int  # process exit status
    stdout: str
    stderr: str = ""
    phases: tuple[tuple[str, float], ...] = ()  # where the time went (seconds), for the server's log


class Phases:
    """Wall time per step of one request: the server logs it, the benchmark reads it."""

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self.spent: list[tuple[str, float]] = []

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.spent.append((name, now - self._last))
        self._last = now


class Clients:
    """etcd clients and IPAM objects per endpoint list and TLS files, reused across requests by the server.
    Allocations for one node are committed in groups in-process (``ipam.batch``; they would only conflict on the
    node's block), other writers still race by CAS. ``tls``: for the calls whose network configuration names no TLS
    files."""

    def __init__(self, tls: EtcdTLS | None = None, timeout: float = DEFAULT_ETCD_TIMEOUT) -> None:
        self.tls = tls
        self.timeout = timeout
        self._lock = threading.Lock()
        self._by_target: dict[tuple[tuple[str, ...], EtcdTLS | None], tuple[EtcdClient, Ipam, GroupAllocator]] = {}

    def get(self, conf: NetConf) -> tuple[EtcdClient, Ipam]:
        client, ipam, _ = self._get(conf)
        return client, ipam

    def allocator(self, conf: NetConf) -> GroupAllocator:
        return self._get(conf)[2]

    def _get(self, conf: NetConf) -> tuple[EtcdClient, Ipam, GroupAllocator]:
        tls = self.tls
        if conf.etcd_ca_file or conf.etcd_cert_file:  # the network configuration's own (parse_conf checked them)
            tls = EtcdTLS(_path(conf.etcd_ca_file), _path(conf.etcd_cert_file), _path(conf.etcd_key_file))
        target = (conf.etcd_endpoints, tls)
        with self._lock:
            found = self._by_target.get(target)
            if found is None:
                try:
                    client = EtcdClient(list(conf.etcd_endpoints), timeout=self.timeout, tls=tls)
                except ValueError as exc:  # a scheme that contradicts the TLS setting, an unreadable file
                    raise CniError(INVALID_CONFIG, f"etcd: {exc}") from None
                ipam = Ipam(client)
                found = (client, ipam, GroupAllocator(ipam))
                self._by_target[target] = found
            return found

    def close(self) -> None:
        with self._lock:
            for client, _, _ in self._by_target.values():
                client.close()
            self._by_target.clear()


def _path(text: str | None) -> Path | None:
    return Path(text) if text else None


def run(env: Mapping[str, str], stdin: bytes, clients: Clients | None = None) -> Outcome:
    own = clients is None
    clients = clients or Clients()
    version = LATEST_VERSION
    phases = Phases()
    try:
        cenv = parse_env(env)
        if cenv.command == "VERSION":
            return _version(stdin)
        data = decode(stdin)
        conf = parse_conf(data, env)
        version = conf.cni_version
        phases.mark("parse")
        result = COMMANDS[cenv.command](cenv, conf, clients, phases)
        return Outcome(0, json.dumps(result) + "\n" if result is not None else "", phases=tuple(phases.spent))
    except CniError as exc:
        return Outcome(1, json.dumps(exc.to_json(version)) + "\n", f"podnet-cni: {exc.msg}\n")
    except Exception as exc:  # a bug: still answer in the spec's format
        log.exception("internal error")
        err = CniError(INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
        return Outcome(1, json.dumps(err.to_json(version)) + "\n", f"podnet-cni: {err.msg}\n")
    finally:
        if own:
            clients.close()


def _version(stdin: bytes) -> Outcome:
    requested = LATEST_VERSION
    try:
        data = json.loads(stdin or b"{}")
        if isinstance(data, dict) and data.get("cniVersion") in SUPPORTED_VERSIONS:
            requested = data["cniVersion"]
    except (UnicodeDecodeError, json.JSONDecodeError):
        pass  # VERSION needs no configuration
    return Outcome(0, json.dumps({"cniVersion": requested, "supportedVersions": list(SUPPORTED_VERSIONS)}) + "\n")


def _ipam_error(exc: Exception) -> CniError:
    if isinstance(exc, (TooManyConflicts, Unavailable, CasConflict)):
        return CniError(TRY_AGAIN_LATER, f"datastore busy or unreachable: {exc}")
    if isinstance(exc, (InvalidRequest, AddressInUse)):
        return CniError(INVALID_CONFIG, str(exc))
    if isinstance(exc, IpamError):
        return CniError(IPAM_FAILURE, str(exc))
    return CniError(TRY_AGAIN_LATER, f"datastore error: {exc}")


def _keys(cenv: CniEnv, conf: NetConf) -> tuple[k.EndpointKey, str]:
    try:
        key = k.EndpointKey(conf.node_name, cenv.pod_namespace, cenv.pod_name, cenv.ifname)
        key.path  # noqa: B018 - renders (validates) every segment
    except InvalidKey as exc:
        raise CniError(INVALID_CONFIG, f"cannot name the endpoint: {exc}") from None
    return key, link.host_ifname(cenv.pod_namespace, cenv.pod_name)


def cmd_add(cenv: CniEnv, conf: NetConf, clients: Clients, phases: Phases) -> dict[str, Any]:
    client, ipam = clients.get(conf)
    store = Store(client)
    _, host_if = _keys(cenv, conf)
    handle = pod_handle(cenv.container_id)
    pod_ref = f"{cenv.pod_namespace}/{cenv.pod_name}"
    undo: list[tuple[str, Callable[[], object]]] = []
    try:
        requested = cenv.requested_ip or (conf.runtime_ips[0] if conf.runtime_ips else None)
        group = clients.allocator(conf)
        try:
            if requested:
                with group.node_lock(conf.node_name):
                    ip = ipam.assign_ip(requested, handle, conf.node_name, pod=pod_ref)
            else:
                ip = group.auto_assign(handle, conf.node_name, pod=pod_ref, pool=conf.pool)
        except (IpamError, DatastoreError) as exc:
            raise _ipam_error(exc) from None
        phases.mark("ipam")
        undo.append(("release the address", lambda: ipam.release_handle(handle)))
        mac = link.pod_mac(cenv.container_id)
        att = link.Attachment(host_if, cenv.ifname, cenv.netns, ip, conf.mtu, mac, conf.host_netns)
        try:
            undo.append(("delete the veth", lambda: link.delete(host_if, conf.host_netns)))
            link.create(att)
        except link.LinkError as exc:
            raise CniError(INTERFACE_FAILURE, f"setting up {host_if}/{cenv.ifname} failed", str(exc)) from None
        phases.mark("link")
        endpoint = m.Endpoint(
            node=conf.node_name,
            namespace=cenv.pod_namespace,
            pod=cenv.pod_name,
            iface=cenv.ifname,
            host_iface=host_if,
            ips=(f"{ip}/32",),
            mac=att.mac,
            container_id=cenv.container_id,
            handle=handle,
        )
        try:
            store.put(endpoint)
        except DatastoreError as exc:
            raise _ipam_error(exc) from None
        phases.mark("endpoint")
    except BaseException:
        for what, step in reversed(undo):
            try:
                step()
            except Exception as exc:  # keep undoing the rest; GC and the next ADD mop up what is left
                log.warning("ADD rollback: could not %s: %s", what, exc)
        raise
    return _result(conf, cenv, host_if, att)


def _result(conf: NetConf, cenv: CniEnv, host_if: str, att: link.Attachment) -> dict[str, Any]:
    ip_entry: dict[str, Any] = {"address": f"{att.ip}/32", "gateway": link.GATEWAY, "interface": 1}
    if conf.cni_version.startswith("0."):
        ip_entry["version"] = "4"
    return {
        "cniVersion": conf.cni_version,
        "interfaces": [
            {"name": host_if, "mac": link.HOST_MAC},
            {"name": cenv.ifname, "mac": att.mac, "sandbox": cenv.netns},
        ],
        "ips": [ip_entry],
        "routes": [{"dst": "0.0.0.0/0", "gw": link.GATEWAY}],
        "dns": {},
    }


def _teardown(
    store: Store,
    release: Callable[[str], object],
    container_id: str,
    *,
    ep_key: k.EndpointKey,
    host_if: str,
    host_netns: str | None,
    phases: Phases | None = None,
) -> None:
    """Remove one attachment: veth and endpoint only if they are this container's (a newer sandbox of the same pod
    keeps its own), then release the handle. Every step tolerates absence."""
    phases = phases or Phases()
    got = store.get(ep_key, m.Endpoint)
    phases.mark("read")
    if got is None or got.value.container_id == container_id:
        try:
            link.delete(host_if, host_netns)
        except link.LinkError as exc:
            raise CniError(INTERFACE_FAILURE, f"deleting {host_if} failed", str(exc)) from None
        phases.mark("link")
        if got is not None:
            with contextlib.suppress(CasConflict):  # replaced meanwhile by a newer sandbox: not ours any more
                store.delete(ep_key, got.mod_revision)
            phases.mark("endpoint")
    release(pod_handle(container_id))
    phases.mark("ipam")


def cmd_del(cenv: CniEnv, conf: NetConf, clients: Clients, phases: Phases) -> None:
    client, _ = clients.get(conf)
    group = clients.allocator(conf)
    ep_key, host_if = _keys(cenv, conf)
    try:
        _teardown(
            Store(client),
            lambda handle: group.release(handle, conf.node_name),
            cenv.container_id,
            ep_key=ep_key,
            host_if=host_if,
            host_netns=conf.host_netns,
            phases=phases,
        )
    except (IpamError, DatastoreError) as exc:
        raise _ipam_error(exc) from None


def cmd_check(cenv: CniEnv, conf: NetConf, clients: Clients, _phases: Phases) -> None:
    client, _ = clients.get(conf)
    store = Store(client)
    ep_key, host_if = _keys(cenv, conf)
    try:
        handle = store.get(k.HandleKey(pod_handle(cenv.container_id)), m.Handle)
        ep = store.get(ep_key, m.Endpoint)
    except DatastoreError as exc:
        raise _ipam_error(exc) from None
    if handle is None or not handle.value.ips:
        raise CniError(CHECK_FAILED, f"no address is allocated to {pod_handle(cenv.container_id)}")
    ip = handle.value.ips[0]
    problems: list[str] = []
    if ep is None or ep.value.container_id != cenv.container_id:
        problems.append(f"endpoint {ep_key.path} is missing or belongs to another container")
    elif ep.value.ips != (f"{ip}/32",):
        problems.append(f"endpoint lists {', '.join(ep.value.ips)}, IPAM says {ip}/32")
    mac = link.pod_mac(cenv.container_id)
    problems += link.verify(link.Attachment(host_if, cenv.ifname, cenv.netns, ip, conf.mtu, mac, conf.host_netns))
    if problems:
        raise CniError(CHECK_FAILED, "attachment is not as configured", "; ".join(problems))


def cmd_status(cenv: CniEnv, conf: NetConf, clients: Clients, _phases: Phases) -> None:
    client, _ = clients.get(conf)
    try:
        client.revision()
        pools = [p for p in Store(client).list(k.POOLS_PREFIX, m.IPPool) if not p.value.disabled]
    except DatastoreError as exc:
        raise CniError(NOT_AVAILABLE, "etcd is unreachable", str(exc)) from None
    if not pools:
        raise CniError(NOT_AVAILABLE, "no enabled IP pool: new pods cannot get an address")


def cmd_gc(cenv: CniEnv, conf: NetConf, clients: Clients, _phases: Phases) -> None:
    """Release this node's pod handles whose attachment the runtime no longer lists."""
    if conf.valid_attachments is None:
        raise CniError(INVALID_CONFIG, "GC needs cni.dev/valid-attachments")
    client, ipam = clients.get(conf)
    store = Store(client)
    valid = {cid for cid, _ in conf.valid_attachments}
    prefix = pod_handle("")
    try:
        endpoints = {ep.value.container_id: ep for ep in store.list(k.endpoints_prefix(conf.node_name), m.Endpoint)}
        for hv in store.list(k.HANDLES_PREFIX, m.Handle):
            h = hv.value
            if h.node != conf.node_name or not h.handle.startswith(prefix):
                continue
            cid = h.handle[len(prefix) :]
            if cid in valid:
                continue
            ep = endpoints.get(cid)
            if ep is not None:
                key = k.EndpointKey(ep.value.node, ep.value.namespace, ep.value.pod, ep.value.iface)
                _teardown(
                    store, ipam.release_handle, cid, ep_key=key, host_if=ep.value.host_iface, host_netns=conf.host_netns
                )
            else:
                ipam.release_handle(h.handle, expect_revision=hv.mod_revision)
    except (IpamError, DatastoreError) as exc:
        raise _ipam_error(exc) from None


COMMANDS: dict[str, Callable[[CniEnv, NetConf, Clients, Phases], Any]] = {
    "ADD": cmd_add,
    "DEL": cmd_del,
    "CHECK": cmd_check,
    "STATUS": cmd_status,
    "GC": cmd_gc,
}
