"""The only writer of podnet's routes: makes the main table's podnet routes (proto ``ROUTE_PROTO``) match a plan.

- Every route it writes carries ``ROUTE_PROTO``; it removes only routes carrying it, never anyone else's.
- A foreign route to the same destination is left alone and reported, except a device route identical to the one
  we want (a pod route someone made by hand): that one is adopted.
- Stale routes are removed only once the caller says the inputs are in sync, so a restart adopts what is there.
- A stale route to a ``cali*`` device is kept for a grace period: the CNI plugin writes a new pod's route before
  its endpoint reaches the agent's cache. When the veth goes, the kernel drops the route with it anyway.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.calc.routes import Route
from agent.dataplane.netlink import Netlink, NetlinkError
from agent.dataplane.stats import Histogram
from datastore.constants import ROUTE_PROTO

log = logging.getLogger(__name__)

MAIN_TABLE = 254
RTN_UNICAST = 1
RTN_BLACKHOLE = 6
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_SCOPE_NOWHERE = 255  # in a delete request: match any scope (what `ip route del` sends)
RTNH_F_ONLINK = 4
POD_ROUTE_GRACE = 30.0


@dataclass(frozen=True)
class KernelRoute:
    """A route as the kernel reports it, reduced to what we compare."""

    cidr: str
    proto: int
    blackhole: bool
    gateway: str | None
    oif: int | None
    onlink: bool


@dataclass(frozen=True)
class Programmed:
    """A planned route as it now stands in the kernel (``dev`` is the kernel's device even where the plan let the
    kernel pick it)."""

    route: Route
    dev: str | None


@dataclass
class RouteResult:
    programmed: dict[str, Programmed] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # cidr -> reason
    removed: list[str] = field(default_factory=list)
    changed: int = 0


class RouteWriter:
    def __init__(
        self, nl: Netlink, pod_grace: float = POD_ROUTE_GRACE, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.nl = nl
        self.pod_grace = pod_grace
        self.clock = clock
        self._stale_since: dict[str, float] = {}
        # The kernel's table as of the end of the last pass (what it read, plus what it wrote). A pass with
        # ``verify=False`` works from it instead of re-reading the table: event-driven passes then cost what
        # changed, not the table's size. Verifying passes (the first one, and the periodic resync) re-read and
        # repair whatever someone else did meanwhile.
        self._model: dict[str, KernelRoute] | None = None
        self._names: dict[int, str] | None = None
        self._index: dict[str, int] = {}
        # For the metrics (read from any thread): seconds per pass, verifying ("full") or not ("incremental"), and
        # the last pass's routes in the kernel by type and its failures (each replaced, never mutated).
        self.durations = {"full": Histogram(), "incremental": Histogram()}
        self.programmed_by_type: dict[str, int] = {}
        self.failed_count = 0

    def dump(self) -> dict[str, KernelRoute]:
        """Main-table unicast and blackhole routes, ours and others' (first one per destination)."""
        out: dict[str, KernelRoute] = {}
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in self.nl.ipr.route("dump", family=family, table=MAIN_TABLE):
                kr = _kernel_route(msg)
                if kr is not None and kr.cidr not in out:
                    out[kr.cidr] = kr
        return out

    def apply(
        self,
        routes: Mapping[str, Route],
        in_sync: bool,
        learned_in_sync: bool | None = None,
        withdrawn: Collection[str] = (),
        verify: bool = True,
    ) -> RouteResult:
        """Program ``routes``. ``in_sync``: the datastore is (stale local routes may go: blackholes, pod routes);
        ``learned_in_sync`` (default: ``in_sync``): BGP has delivered what peers have, so a remote route missing
        from the plan really was withdrawn (after a restart the RIB starts empty; the kernel keeps forwarding).
        ``withdrawn``: prefixes BGP did deliver and then withdrew; they go even before ``learned_in_sync``.
        ``verify=False``: trust the table as left by the last pass instead of reading it (see ``_model``)."""
        started = time.perf_counter()
        result = RouteResult()
        verify = verify or self._model is None
        have = self.dump() if verify else dict(self._model or {})
        model = dict(have)
        # Link names: read on verifying passes, or when the plan names a device we have not seen (a new pod).
        if verify or self._names is None or any(r.dev not in self._index for r in routes.values() if r.dev):
            self._names = self.nl.names()
            self._index = {name: idx for idx, name in self._names.items()}
        names, index = self._names, self._index
        for cidr, route in sorted(routes.items()):
            cur = have.get(cidr)
            oif = None
            if route.dev is not None:
                oif = index.get(route.dev)
                if oif is None:
                    result.failed[cidr] = f"device {route.dev} does not exist"
                    continue
            if cur is not None and cur.proto != ROUTE_PROTO and not _adoptable(cur, route, oif):
                result.failed[cidr] = f"a route to {cidr} not made by podnet (proto {cur.proto}) is in the way"
                continue
            if cur is None or cur.proto != ROUTE_PROTO or not _matches(cur, route, oif):
                try:
                    self.nl.ipr.route("replace", **_request(route, oif))
                except NetlinkError as exc:
                    result.failed[cidr] = f"kernel refused: {exc}"
                    continue
                result.changed += 1
                model[cidr] = cur = KernelRoute(cidr, ROUTE_PROTO, route.blackhole, route.via, oif, route.onlink)
            dev = names.get(cur.oif) if cur.oif is not None else route.dev
            result.programmed[cidr] = Programmed(route, dev)
        # Where the kernel picked the device (a direct route), read back which one it took.
        unknown = [c for c, done in result.programmed.items() if done.dev is None and not done.route.blackhole]
        if unknown and verify:
            model = self.dump()  # one dump, not one per route: a first pass may write thousands
        elif unknown:
            for cidr in unknown:
                oif = _device_for(self.nl, cidr)
                if oif is not None and cidr in model:
                    model[cidr] = dataclasses.replace(model[cidr], oif=oif)
        for cidr in unknown:
            kr = model.get(cidr)
            if kr is not None and kr.oif is not None:
                result.programmed[cidr] = Programmed(result.programmed[cidr].route, names.get(kr.oif))
        if in_sync:
            learned_ok = in_sync if learned_in_sync is None else learned_in_sync
            self._remove_stale(have, routes, names, result, learned_ok=learned_ok, withdrawn=set(withdrawn))
            for cidr in result.removed:
                model.pop(cidr, None)
        self._model = model
        for cidr, why in result.failed.items():
            log.warning("route %s: %s", cidr, why)
        by_type: dict[str, int] = {}
        for done in result.programmed.values():
            by_type[done.route.type] = by_type.get(done.route.type, 0) + 1
        self.programmed_by_type = by_type
        self.failed_count = len(result.failed)
        self.durations["full" if verify else "incremental"].observe(time.perf_counter() - started)
        return result

    def remove_all(self) -> list[str]:
        """Delete every route carrying ``ROUTE_PROTO`` (uninstall); anyone else's routes stay. Returns the removed
        destinations."""
        removed: list[str] = []
        for cidr, kr in sorted(self.dump().items()):
            if kr.proto != ROUTE_PROTO:
                continue
            try:
                self.nl.ipr.route("del", **_delete_request(kr))
            except NetlinkError as exc:
                if exc.code != 3:  # ESRCH: gone already (its device went away meanwhile)
                    raise
            removed.append(cidr)
        self._model = None
        self._stale_since.clear()
        return removed

    def _remove_stale(
        self,
        have: dict[str, KernelRoute],
        routes: Mapping[str, Route],
        names: dict[int, str],
        result: RouteResult,
        *,
        learned_ok: bool,
        withdrawn: set[str],
    ) -> None:
        now = self.clock()
        stale = {c: kr for c, kr in have.items() if kr.proto == ROUTE_PROTO and c not in routes}
        for cidr in list(self._stale_since):
            if cidr not in stale:
                del self._stale_since[cidr]
        for cidr, kr in sorted(stale.items()):
            dev = names.get(kr.oif) if kr.oif is not None else None
            local = kr.blackhole or (dev is not None and dev.startswith("cali"))
            if not local and not learned_ok and cidr not in withdrawn:
                continue
            if dev is not None and dev.startswith("cali"):
                first = self._stale_since.setdefault(cidr, now)
                if now - first < self.pod_grace:
                    continue
            try:
                self.nl.ipr.route("del", **_delete_request(kr))
            except NetlinkError as exc:
                if exc.code != 3 or _lookup(self.nl, cidr) is not None:  # ESRCH and gone: its device went away
                    result.failed[cidr] = f"could not remove stale route: {exc}"
                    continue
            self._stale_since.pop(cidr, None)
            result.removed.append(cidr)
            result.changed += 1


def _kernel_route(msg: Any) -> KernelRoute | None:
    if msg["type"] not in (RTN_UNICAST, RTN_BLACKHOLE) or msg.get("RTA_TABLE", msg["table"]) != MAIN_TABLE:
        return None
    if msg.get("RTA_MULTIPATH") is not None:
        return None  # not a shape we write
    family = msg["family"]
    dst = msg.get("RTA_DST") or ("0.0.0.0" if family == socket.AF_INET else "::")
    cidr = str(ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False))
    oif = msg.get("RTA_OIF")
    return KernelRoute(
        cidr=cidr,
        proto=int(msg["proto"]),
        blackhole=msg["type"] == RTN_BLACKHOLE,
        gateway=msg.get("RTA_GATEWAY"),
        oif=None if oif is None else int(oif),
        onlink=bool(msg["flags"] & RTNH_F_ONLINK),
    )


def _lookup(nl: Netlink, cidr: str) -> KernelRoute | None:
    net = ipaddress.ip_network(cidr)
    family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    for msg in nl.ipr.route("dump", family=family, table=MAIN_TABLE, proto=ROUTE_PROTO):
        kr = _kernel_route(msg)
        if kr is not None and kr.cidr == cidr:
            return kr
    return None


def _device_for(nl: Netlink, cidr: str) -> int | None:
    """The device the kernel forwards ``cidr`` through: a targeted route lookup, not a table dump."""
    net = ipaddress.ip_network(cidr)
    try:
        msgs = nl.ipr.route(
            "get", dst=str(net.network_address), family=socket.AF_INET if net.version == 4 else socket.AF_INET6
        )
    except NetlinkError:
        return None
    for msg in msgs:
        oif = msg.get("RTA_OIF")
        if oif is not None:
            return int(oif)
    return None


def _matches(cur: KernelRoute, route: Route, oif: int | None) -> bool:
    if route.blackhole:
        return cur.blackhole
    if cur.blackhole or cur.gateway != route.via:
        return False
    if oif is not None and cur.oif != oif:
        return False
    return cur.onlink == route.onlink


def _adoptable(cur: KernelRoute, route: Route, oif: int | None) -> bool:
    """A foreign device route identical to a pod route we want (made by hand, or by a CNI plugin of old)."""
    return route.type == "local-pod" and not cur.blackhole and cur.gateway is None and cur.oif == oif


def _base_request(cidr: str) -> dict[str, Any]:
    """The fields that identify one of our routes: destination, family, table and our proto."""
    net = ipaddress.ip_network(cidr)
    return {
        "dst": str(net.network_address),
        "dst_len": net.prefixlen,
        "family": socket.AF_INET if net.version == 4 else socket.AF_INET6,
        "table": MAIN_TABLE,
        "proto": ROUTE_PROTO,
    }


def _request(route: Route, oif: int | None) -> dict[str, Any]:
    req = _base_request(route.cidr)
    if route.blackhole:
        req["type"] = "blackhole"
        return req
    if route.via is not None:
        req["gateway"] = route.via
        req["scope"] = RT_SCOPE_UNIVERSE
    else:
        req["scope"] = RT_SCOPE_LINK
    if oif is not None:
        req["oif"] = oif
    if route.onlink:
        req["flags"] = RTNH_F_ONLINK
    return req


def _delete_request(kr: KernelRoute) -> dict[str, Any]:
    req = _base_request(kr.cidr)
    req["scope"] = RT_SCOPE_NOWHERE
    if kr.blackhole:
        req["type"] = "blackhole"
    return req
