"""Node bootstrap: the node's record in etcd, the sysctls the dataplane needs, and the node's address kept current.

- ``register_node`` writes ``nodes/<name>`` by compare-and-swap on the record's mod revision (retried when someone
  changed it between our read and our write): the agent owns the address (``ip``), the AS number only when its own
  option gives one, and the VTEP MAC when the record has none; every other field is the operator's and is kept. Then
  the tunnel addresses the pools' encapsulations need come from IPAM (``Ipam.ensure_tunnel_address``, which records
  them on the node itself).
- ``set_sysctls`` sets forwarding and the tunnel device's reverse-path filter (see ``wanted_sysctls``) in the node's
  network namespace and says what each was and became.
- ``AddressWatcher`` (a daemon component) re-runs the autodetection every ``interval`` seconds and re-registers the
  node when its address changed; each round it also re-applies the sysctls, so that a tunnel device created after
  start-up (by the route writer) gets its setting.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from agent.calc.routes import IPIP_DEVICE, VXLAN_DEVICE, vtep_mac
from cni.link import LinkError, in_netns
from daemon import autodetect
from daemon.component import Health, Heartbeat
from daemon.threads import Threads
from datastore import keys as k
from datastore import model as m
from datastore.errors import CasConflict, DatastoreError
from datastore.etcd import EtcdClient
from datastore.store import Store
from ipam.allocator import Ipam
from ipam.errors import IpamError

log = logging.getLogger(__name__)

MAX_CAS_ROUNDS = 10
TUNNEL_DEVICES = {"vxlan": VXLAN_DEVICE, "ipip": IPIP_DEVICE}
_NETNS_DIR = "/run/netns"


class RegistrationError(Exception):
    """The node record could not be written (lost every compare-and-swap round)."""


# -- the node record ------------------------------------------------------------------------------------------


def tunnel_kinds(pools: Iterable[m.IPPool]) -> tuple[str, ...]:
    """The tunnel devices the pools' encapsulations need on every node ("ipip", "vxlan"), sorted. Disabled pools
    count: their blocks still route (agent/calc/routes.py plans them the same way)."""
    return tuple(sorted({p.encapsulation for p in pools} & set(TUNNEL_DEVICES)))


def merge(
    existing: m.Node | None, name: str, ip: str, as_number: int | None, vxlan: bool
) -> tuple[m.Node, list[str], list[str]]:
    """The record to write (pure): ``ip`` is the agent's, ``as_number`` only if the agent's option gave one, the
    VTEP MAC when ``vxlan`` is needed and the record has none; everything else stays as the operator wrote it.
    Returns the record, what we set ("field value (was old)") and which operator fields were kept."""
    node = existing if existing is not None else m.Node(name=name, ip=ip)
    written: list[str] = []
    kept: list[str] = []
    if existing is None or existing.ip != ip:
        written.append(f"ip {ip}" + ("" if existing is None else f" (was {existing.ip})"))
        node = replace(node, ip=ip)
    if as_number is not None:
        if node.as_number != as_number:
            written.append(f"asNumber {as_number}" + ("" if node.as_number is None else f" (was {node.as_number})"))
            node = replace(node, as_number=as_number)
    elif node.as_number is not None:
        kept.append(f"asNumber {node.as_number}")
    if vxlan and node.vxlan_mac is None:
        # The same MAC the route calculation derives for a record without one (every node computes the peer's FDB
        # entry from the record): written so that operators see it, and can pin another one.
        mac = vtep_mac(node)
        written.append(f"vxlanMAC {mac}")
        node = replace(node, vxlan_mac=mac)
    elif existing is not None and existing.vxlan_mac is not None:
        kept.append(f"vxlanMAC {existing.vxlan_mac}")
    if node.rr_cluster_id is not None:
        kept.append(f"routeReflectorClusterID {node.rr_cluster_id}")
    if node.labels:
        kept.append("labels " + ",".join(f"{key}={value}" for key, value in sorted(node.labels.items())))
    for what, value in (("tunnelAddress", node.tunnel_address), ("vxlanAddress", node.vxlan_address)):
        if value is not None:
            kept.append(f"{what} {value}")
    return node, written, kept


def record_drift(record: m.Node | None, ip: str, kinds: Sequence[str], as_number: int | None) -> str:
    """How the node's record in etcd differs from what registration would make of it ("" if it does not): someone
    deleted or overwrote it, or a pool that needs a tunnel was added after start-up (pure)."""
    if record is None:
        return "is missing"
    drift = []
    if record.ip != ip:
        drift.append(f"says ip {record.ip}, not {ip}")
    if as_number is not None and record.as_number != as_number:
        drift.append(f"says asNumber {record.as_number}, not {as_number}")
    if "vxlan" in kinds and record.vxlan_address is None:
        drift.append("has no vxlan tunnel address")
    if "vxlan" in kinds and record.vxlan_mac is None:
        drift.append("has no VTEP MAC")
    if "ipip" in kinds and record.tunnel_address is None:
        drift.append("has no ipip tunnel address")
    return ", ".join(drift)


@dataclass(frozen=True)
class NodeRegistration:
    node: m.Node  # the record as it is in etcd after registration (tunnel addresses included)
    created: bool
    written: tuple[str, ...]  # what the agent set: "ip 192.168.77.10/24 (was 192.168.77.9/24)", "vxlanMAC …"
    kept: tuple[str, ...]  # the operator's fields left as they were: "asNumber 64600", "labels rack=a"
    tunnels: dict[str, str] = field(default_factory=dict)  # kind → address from IPAM
    conflicts: int = 0  # compare-and-swap rounds lost to concurrent writers
    problems: tuple[str, ...] = ()  # e.g. a tunnel address IPAM could not give

    def describe(self) -> str:
        what = "created" if self.created else ("updated" if self.written else "unchanged")
        parts = [f"node {self.node.name} record {what}"]
        if self.written:
            parts.append("set " + ", ".join(self.written))
        if self.kept:
            parts.append("kept " + ", ".join(self.kept))
        if self.tunnels:
            parts.append("tunnel " + ", ".join(f"{kind} {ip}" for kind, ip in sorted(self.tunnels.items())))
        if self.conflicts:
            parts.append(f"{self.conflicts} compare-and-swap conflict(s) retried")
        parts.extend(f"problem: {p}" for p in self.problems)
        return "; ".join(parts)


def register_node(
    client: EtcdClient,
    name: str,
    detected: autodetect.Detected,
    as_number: int | None,
    *,
    ipam: Ipam | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> NodeRegistration:
    """Write this node's record (see the module's doc) and ensure its tunnel addresses. Raises
    ``RegistrationError`` after ``MAX_CAS_ROUNDS`` lost rounds, ``DatastoreError`` when etcd fails."""
    store = Store(client)
    kinds = tunnel_kinds(v.value for v in store.list(k.POOLS_PREFIX, m.IPPool))
    ip = str(detected.address)
    conflicts = 0
    for attempt in range(MAX_CAS_ROUNDS):
        got = store.get(k.NodeKey(name), m.Node)
        node, written, kept = merge(got.value if got else None, name, ip, as_number, "vxlan" in kinds)
        if got is None or written:
            try:
                store.cas(node, got.mod_revision if got else 0)
            except CasConflict:
                conflicts += 1
                sleep(random.uniform(0.0, 0.02 * (attempt + 1)))  # jitter: concurrent writers part
                continue
        break
    else:
        raise RegistrationError(f"node {name}: lost {MAX_CAS_ROUNDS} compare-and-swap rounds writing its record")
    tunnels: dict[str, str] = {}
    problems: list[str] = []
    ipam = ipam or Ipam(client)
    for kind in kinds:
        have = node.tunnel_address if kind == "ipip" else node.vxlan_address
        if have is not None:
            tunnels[kind] = have  # the record's (allocated by an earlier run, or pinned by the operator): kept
            continue
        try:
            tunnels[kind] = ipam.ensure_tunnel_address(name, kind)
        except IpamError as exc:
            problems.append(f"no {kind} tunnel address: {exc}")
    final = store.get(k.NodeKey(name), m.Node)
    return NodeRegistration(
        node=final.value if final is not None else node,
        created=got is None,
        written=tuple(written),
        kept=tuple(kept),
        tunnels=tunnels,
        conflicts=conflicts,
        problems=tuple(problems),
    )


# -- sysctls --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SysctlResult:
    name: str  # as sysctl(8) writes it: a dot in a device name becomes "/" (net.ipv4.conf.vxlan/podnet.rp_filter)
    old: str | None = None  # None: could not be read (the error says why)
    new: str | None = None
    error: str | None = None
    absent: bool = False  # the device does not exist yet: set in a later round

    @property
    def changed(self) -> bool:
        return self.error is None and not self.absent and self.old != self.new

    def describe(self) -> str:
        if self.absent:
            return f"sysctl {self.name}: device not there yet, set once it is"
        if self.error is not None:
            return f"sysctl {self.name}: {self.error}"
        if self.changed:
            return f"sysctl {self.name}: {self.old} → {self.new}"
        return f"sysctl {self.name} = {self.new} (already)"


def wanted_sysctls(encapsulation: str | Sequence[str]) -> list[tuple[str, str, str | None]]:
    """(sysctl name, value, device it belongs to or None) for the given encapsulation(s) (pure).

    - ``net.ipv4.ip_forward=1``: the node routes between pods, tunnels and the underlay.
    - With a tunnel, its device's ``rp_filter=2`` (loose). A packet decapsulated there comes from a remote pod whose
      block may be routed back another way: a pool with another encapsulation or crossSubnet, a BGP route not yet
      programmed (the reverse lookup then finds the default route on the underlay). Strict mode drops those. The
      kernel applies max(conf.all, conf.<dev>), so 2 on the device makes it loose whatever ``all`` is, while the
      operator's ``all`` (and the pods' veths) keep their own, stricter, anti-spoofing setting: loosening ``all``
      as some installers do would loosen every interface.
    - No proxy ARP here: the CNI turns it on per host veth (cni/link.py: the pod's gateway 169.254.1.1 is answered
      by proxy ARP on the host side), and VXLAN next hops are permanent neighbour entries, so nothing ARPs over the
      tunnel.
    """
    kinds = [encapsulation] if isinstance(encapsulation, str) else list(encapsulation)
    out: list[tuple[str, str, str | None]] = [("net.ipv4.ip_forward", "1", None)]
    for kind in sorted(set(kinds) & set(TUNNEL_DEVICES)):
        dev = TUNNEL_DEVICES[kind]
        out.append((f"net.ipv4.conf.{dev.replace('.', '/')}.rp_filter", "2", dev))
    return out


def _proc_path(name: str) -> str:
    # sysctl(8) naming: "." separates components, "/" stands for a "." inside one (a device name).
    return "/proc/sys/" + "/".join(part.replace("/", ".") for part in name.split("."))


def _apply(wanted: list[tuple[str, str, str | None]]) -> list[SysctlResult]:
    out: list[SysctlResult] = []
    for name, value, dev in wanted:
        path = _proc_path(name)
        try:
            with open(path) as fh:
                old = fh.read().strip()
        except FileNotFoundError:
            out.append(SysctlResult(name, absent=dev is not None, error=None if dev else f"{path} does not exist"))
            continue
        except OSError as exc:
            out.append(SysctlResult(name, error=f"reading {path}: {exc.strerror}"))
            continue
        if old == value:
            out.append(SysctlResult(name, old, value))
            continue
        try:
            with open(path, "w") as fh:
                fh.write(value)
        except OSError as exc:
            out.append(SysctlResult(name, old, error=f"writing {value} to {path}: {exc.strerror}"))
            continue
        out.append(SysctlResult(name, old, value))
    return out


def apply_sysctls(netns: str | None, encapsulation: str | Sequence[str]) -> list[SysctlResult]:
    """``set_sysctls`` without the log lines (for periodic re-application)."""
    wanted = wanted_sysctls(encapsulation)
    try:
        # /proc/sys/net follows the network namespace of the thread that opens it: enter it in this thread only.
        return in_netns(None if netns is None else f"{_NETNS_DIR}/{netns}", lambda: _apply(wanted))
    except LinkError as exc:
        return [SysctlResult(name, error=str(exc)) for name, _, _ in wanted]


def set_sysctls(netns: str | None, encapsulation: str | Sequence[str]) -> list[SysctlResult]:
    """Set the sysctls the dataplane needs (``wanted_sysctls``) in ``netns`` (None: this thread's namespace, the
    node's) and log each result once. ``encapsulation``: "none", "vxlan", "ipip", or several (``tunnel_kinds``)."""
    results = apply_sysctls(netns, encapsulation)
    for r in results:
        (log.warning if r.error else log.info)("%s", r.describe())
    return results


# -- the periodic re-check -------------------------------------------------------------------------------------


class AddressWatcher:
    """A daemon component: every ``interval`` seconds, detect the node's address again (``method``, in ``netns``)
    and re-register the node when it changed, or when the record in etcd drifted (``record_drift``: two reads a
    round, a write only to repair); re-apply the sysctls of ``encapsulation``. Failures (no address, etcd away) are
    logged once per change of state and retried next round; the registered address stays meanwhile.

    Ready throughout: the node keeps working on its last address while detection fails; the reason says so."""

    def __init__(
        self,
        client: EtcdClient,
        node: str,
        method: autodetect.Method,
        current: autodetect.Detected,
        threads: Threads,
        *,
        as_number: int | None = None,
        netns: str | None = None,
        encapsulation: str | Sequence[str] = (),
        interval: float = 30.0,
        name: str = "node-address",
        on_registered: Callable[[NodeRegistration], None] | None = None,
    ) -> None:
        self._name = name
        self._client = client
        self.node = node
        self.method = method
        self.netns = netns
        self.as_number = as_number
        self.encapsulation = encapsulation
        self.interval = interval
        self._threads = threads
        self._on_registered = on_registered
        self._registered = current  # what the node record says (as far as we wrote it)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_problem = ""
        self._last_drift = ""
        self._sysctl_state: dict[str, tuple[str | None, str | None, bool]] = {}
        # A round is one netlink dump, at most one registration (a few etcd calls, each within the client's
        # timeout) and a few /proc writes: three intervals plus the etcd timeouts is a wedge, not a slow round.
        self._heartbeat = Heartbeat(3 * interval + 6 * client.timeout, reason=self._describe(current))

    @property
    def name(self) -> str:
        return self._name

    @property
    def registered(self) -> autodetect.Detected:
        return self._registered

    def start(self) -> None:
        self._heartbeat.beat(ready=True)
        self._thread = self._threads.spawn(self._name, f"{self._name}-loop", self._loop)

    def stop(self, deadline: float) -> None:
        self._threads.stopping(self._name)
        self._stop.set()
        thread = self._thread
        if thread is not None and thread.is_alive():
            thread.join(max(0.0, deadline - time.monotonic()))
        self._heartbeat.set(ready=False, reason="stopped")

    def health(self) -> Health:
        return self._heartbeat.snapshot()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.check()

    def check(self) -> None:
        """One round (the loop's; callable directly, e.g. on SIGHUP)."""
        problem = ""
        try:
            found = autodetect.detect(self.method, self.netns)
        except autodetect.AutodetectError as exc:
            problem = f"node IP autodetection ({self.method.text}) failed, keeping {self._registered.address}: {exc}"
        else:
            if (found.address, found.interface) != (self._registered.address, self._registered.interface):
                problem = self._reregister(found)
        if not problem:
            problem = self._repair()
        self._sysctls()
        if problem != self._last_problem:
            if problem:
                log.warning("%s", problem)
            elif self._last_problem:
                log.info("node %s: %s", self.node, self._describe(self._registered))
            self._last_problem = problem
        self._heartbeat.beat(ready=True, reason=problem or self._describe(self._registered))

    def _reregister(self, found: autodetect.Detected) -> str:
        old = self._registered
        try:
            reg = register_node(self._client, self.node, found, self.as_number)
        except (DatastoreError, RegistrationError) as exc:
            return f"node IP changed to {found.address} on {found.interface}; record not updated yet: {exc}"
        self._registered = found
        log.warning(
            "node %s: address changed %s on %s → %s on %s (%s); %s",
            self.node,
            old.address,
            old.interface,
            found.address,
            found.interface,
            found.method,
            reg.describe(),
        )
        if self._on_registered is not None:
            self._on_registered(reg)
        return ""

    def _repair(self) -> str:
        """Register again if the record drifted from what we registered; a problem, or ""."""
        try:
            store = Store(self._client)
            got = store.get(k.NodeKey(self.node), m.Node)
            kinds = tunnel_kinds(v.value for v in store.list(k.POOLS_PREFIX, m.IPPool))
        except DatastoreError as exc:
            return f"node record not checked: {exc}"
        drift = record_drift(got.value if got else None, str(self._registered.address), kinds, self.as_number)
        if not drift:
            self._last_drift = ""
            return ""
        try:
            reg = register_node(self._client, self.node, self._registered, self.as_number)
        except (DatastoreError, RegistrationError) as exc:
            return f"node {self.node} record {drift}; not repaired yet: {exc}"
        if drift != self._last_drift:  # a pool that cannot give a tunnel address is retried, not logged, each round
            log.warning("node %s: record %s: registered again; %s", self.node, drift, reg.describe())
            if self._on_registered is not None:
                self._on_registered(reg)
        self._last_drift = drift
        return "; ".join(reg.problems)

    def _sysctls(self) -> None:
        if not self.encapsulation:
            return
        for r in apply_sysctls(self.netns, self.encapsulation):
            state = (r.new, r.error, r.absent)
            before = self._sysctl_state.get(r.name)
            if before != state and (r.changed or r.error or before is not None):
                # Logged when a value had to be (re)set or an error is new, not every round.
                (log.warning if r.error else log.info)("%s", r.describe())
            self._sysctl_state[r.name] = state

    def _describe(self, d: autodetect.Detected) -> str:
        return f"node IP {d.address} on {d.interface} ({d.method})"
