"""The tunnel devices: ``vxlan.podnet`` (with its static FDB and neighbour entries) and ``tunl0``.

Ensure-and-repair: whatever is there is adopted if it matches the plan, fixed in place where the kernel allows
(MTU, MAC, state, addresses), and recreated only when an immutable attribute (VNI, port, source, parent) is wrong.
Both devices are ours by name; FDB and neighbour entries on ``vxlan.podnet`` are therefore ours too.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from agent.calc.routes import (
    IPIP_DEVICE,
    IPIP_OVERHEAD,
    VXLAN_DEVICE,
    VXLAN_OVERHEAD,
    IpipDevice,
    RoutePlan,
    VxlanDevice,
)
from agent.calc.routes import VxlanPeer as Peer
from agent.dataplane.netlink import Netlink, NetlinkError
from agent.dataplane.stats import Histogram

log = logging.getLogger(__name__)

NUD_PERMANENT = 0x80
NTF_SELF = 0x02
IFF_UP = 0x1


class IpipUnavailable(RuntimeError):
    """The kernel cannot make IPIP devices (no ``ipip`` module): pools with IPIP encapsulation cannot be served."""


@dataclass
class LinkResult:
    problems: list[str] = field(default_factory=list)
    # A device was created, recreated or brought up: the kernel dropped (or never had) the routes through it, so
    # the route writer must read the table again rather than trust its model of it.
    devices_changed: bool = False


class LinkWriter:
    def __init__(self, nl: Netlink) -> None:
        self.nl = nl
        # FDB and neighbour entries of vxlan.podnet as of the last pass (see RouteWriter._model): for passes
        # with verify=False.
        self._fdb: set[tuple[str, str]] | None = None
        self._neigh: set[tuple[str, str]] | None = None
        # The device as last ensured (what was asked, and its index): a pass with verify=False and the same ask
        # does not look at the device again. Verifying passes always do.
        self._vxlan: tuple[VxlanDevice, int] | None = None
        self._ipip: IpipDevice | None = None
        # For the metrics: seconds per pass, verifying ("full") or not ("incremental"); the last pass's problems.
        self.durations = {"full": Histogram(), "incremental": Histogram()}
        self.problem_count = 0

    def apply(
        self, plan: RoutePlan, in_sync: bool, learned_in_sync: bool | None = None, verify: bool = True
    ) -> LinkResult:
        """``in_sync``: the datastore is (an unneeded device may go); ``learned_in_sync`` (default ``in_sync``): BGP
        is, so FDB and neighbour entries of VTEPs no route uses any more may go. ``verify=False``: trust the FDB
        and neighbour entries, and the devices, as left by the last pass instead of reading them."""
        started = time.perf_counter()
        result = LinkResult()
        learned_ok = in_sync if learned_in_sync is None else learned_in_sync
        try:
            if plan.vxlan is not None:
                if not verify and self._vxlan is not None and self._vxlan[0] == plan.vxlan:
                    index, changed = self._vxlan[1], False
                else:
                    self._vxlan = None
                    index, changed = self.ensure_vxlan(plan.vxlan)
                    self._vxlan = (plan.vxlan, index)
                result.devices_changed |= changed
                self.sync_vxlan_peers(
                    plan.vxlan_peers, remove_stale=in_sync and learned_ok, verify=verify or changed, index=index
                )
            elif in_sync and self.remove_vxlan():
                result.devices_changed = True
        except (NetlinkError, LookupError) as exc:
            self._vxlan = None
            result.problems.append(f"{VXLAN_DEVICE}: {exc}")
        if plan.ipip is not None and (verify or self._ipip != plan.ipip):
            self._ipip = None
            try:
                _, changed = self.ensure_ipip(plan.ipip)
                result.devices_changed |= changed
                self._ipip = plan.ipip
            except (NetlinkError, LookupError, IpipUnavailable) as exc:
                result.problems.append(f"{IPIP_DEVICE}: {exc}")
        for p in result.problems:
            log.warning("device: %s", p)
        self.problem_count = len(result.problems)
        self.durations["full" if verify else "incremental"].observe(time.perf_counter() - started)
        return result

    # -- VXLAN ------------------------------------------------------------------------------------------------

    def _parent(self, local_ip: str) -> tuple[int, int]:
        """The underlay link (index, MTU) that carries ``local_ip``."""
        index = self.nl.link_of_address(local_ip)
        if index is None:
            raise LookupError(f"no link carries the node address {local_ip}")
        return index, int(self.nl.link(index).get("IFLA_MTU"))

    def ensure_vxlan(self, want: VxlanDevice) -> tuple[int, bool]:
        """The device's index, and whether it was created, recreated or brought up."""
        parent, host_mtu = self._parent(want.local_ip)
        changed = False
        mtu = host_mtu - VXLAN_OVERHEAD
        ipr = self.nl.ipr
        index = self.nl.index(VXLAN_DEVICE)
        if index is not None and not _vxlan_matches(self.nl.link(index), want, parent):
            log.info("recreating %s: VNI, port, source or parent changed", VXLAN_DEVICE)
            ipr.link("del", index=index)
            index = None
        if index is None:
            changed = True
            ipr.link(
                "add",
                ifname=VXLAN_DEVICE,
                kind="vxlan",
                vxlan_id=want.vni,
                vxlan_port=want.port,
                vxlan_local=want.local_ip,
                vxlan_link=parent,
                vxlan_learning=0,
                address=want.mac,
                mtu=mtu,
            )
            index = self.nl.index(VXLAN_DEVICE)
            assert index is not None
        link = self.nl.link(index)
        changes: dict[str, Any] = {}
        if link.get("IFLA_MTU") != mtu:
            changes["mtu"] = mtu
        if str(link.get("IFLA_ADDRESS")).lower() != want.mac:
            changes["address"] = want.mac
        if not link["flags"] & IFF_UP:
            changes["state"] = "up"
            changed = True  # a device going down loses its routes and neighbours
        if changes:
            ipr.link("set", index=index, **changes)
        self._ensure_addresses(index, [want.address] if want.address else [])
        return index, changed

    def remove_vxlan(self) -> bool:
        index = self.nl.index(VXLAN_DEVICE)
        self._fdb = self._neigh = self._vxlan = None
        if index is None:
            return False
        self.nl.ipr.link("del", index=index)
        return True

    def sync_vxlan_peers(
        self, peers: tuple[Peer, ...], remove_stale: bool, verify: bool = True, index: int | None = None
    ) -> None:
        if index is None:
            index = self.nl.index(VXLAN_DEVICE)
        if index is None:
            raise LookupError(f"{VXLAN_DEVICE} is missing")
        ipr = self.nl.ipr
        fdb_want = {(p.mac, p.node_ip) for p in peers}
        neigh_want = {(p.next_hop, p.mac) for p in peers}
        if verify or self._fdb is None or self._neigh is None:
            fdb_have, neigh_have = self._read_peers(index)
        else:
            fdb_have, neigh_have = set(self._fdb), set(self._neigh)
        self._fdb = self._neigh = None  # unknown until this pass finishes
        # FDB before neighbours: a neighbour resolved to a MAC with no FDB entry would blackhole packets.
        for mac, dst in sorted(fdb_want - fdb_have):
            ipr.fdb("replace", ifindex=index, lladdr=mac, dst=dst, state=NUD_PERMANENT, flags=NTF_SELF)
            fdb_have.add((mac, dst))
        for dst, mac in sorted(neigh_want - neigh_have):
            ipr.neigh("replace", ifindex=index, dst=dst, lladdr=mac, state=NUD_PERMANENT)
            neigh_have = {(d, x) for d, x in neigh_have if d != dst} | {(dst, mac)}  # replace keys on dst
        if remove_stale:
            wanted_neigh_dsts = {dst for dst, _ in neigh_want}
            for dst, mac in sorted(neigh_have - neigh_want):
                if dst not in wanted_neigh_dsts:
                    ipr.neigh("del", ifindex=index, dst=dst, lladdr=mac)
                    neigh_have.discard((dst, mac))
            for mac, dst in sorted(fdb_have - fdb_want):
                ipr.fdb("del", ifindex=index, lladdr=mac, dst=dst, flags=NTF_SELF)
                fdb_have.discard((mac, dst))
        self._fdb, self._neigh = fdb_have, neigh_have

    def _read_peers(self, index: int) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
        fdb: set[tuple[str, str]] = set()
        for msg in self.nl.ipr.fdb("dump", ifindex=index):
            if msg["ifindex"] == index and msg.get("NDA_DST"):
                fdb.add((str(msg.get("NDA_LLADDR")).lower(), str(msg.get("NDA_DST"))))
        neigh: set[tuple[str, str]] = set()
        for msg in self.nl.ipr.neigh("dump", ifindex=index):
            if msg["ifindex"] == index and msg["family"] in (socket.AF_INET, socket.AF_INET6):
                neigh.add((str(msg.get("NDA_DST")), str(msg.get("NDA_LLADDR")).lower()))
        return fdb, neigh

    # -- IPIP -------------------------------------------------------------------------------------------------

    def ensure_ipip(self, want: IpipDevice) -> tuple[int, bool]:
        """``tunl0`` appears by itself once the ``ipip`` module is loaded; asking for it loads the module if the
        kernel has one. Without it, report clearly: no route through tunl0 can work."""
        _, host_mtu = self._parent(want.local_ip)
        mtu = host_mtu - IPIP_OVERHEAD
        ipr = self.nl.ipr
        index = self.nl.index(IPIP_DEVICE)
        changed = False
        if index is None:
            changed = True
            try:
                ipr.link("add", ifname=IPIP_DEVICE, kind="ipip")
            except NetlinkError as exc:
                raise IpipUnavailable(f"this kernel cannot create IPIP devices ({exc})") from None
            index = self.nl.index(IPIP_DEVICE)
            if index is None:
                raise IpipUnavailable("tunl0 did not appear after creating it")
        link = self.nl.link(index)
        changes: dict[str, Any] = {}
        if link.get("IFLA_MTU") != mtu:
            changes["mtu"] = mtu
        if not link["flags"] & IFF_UP:
            changes["state"] = "up"
            changed = True
        if changes:
            ipr.link("set", index=index, **changes)
        self._ensure_addresses(index, [want.address] if want.address else [])
        return int(index), changed

    # -- shared -----------------------------------------------------------------------------------------------

    def _ensure_addresses(self, index: int, wanted: list[str]) -> None:
        """Exactly ``wanted`` (as host addresses) on a device we own."""
        ipr = self.nl.ipr
        want: set[tuple[str, int]] = {
            (str(ipaddress.ip_address(a)), ipaddress.ip_address(a).max_prefixlen) for a in wanted
        }
        have: set[tuple[str, int]] = set()
        for msg in ipr.addr("dump", index=index):
            if msg["index"] == index and msg["family"] == socket.AF_INET:
                have.add((str(msg.get("IFA_ADDRESS")), int(msg["prefixlen"])))
        for addr, plen in sorted(want - have):
            ipr.addr("add", index=index, address=addr, prefixlen=plen)
        for addr, plen in sorted(have - want):
            ipr.addr("del", index=index, address=addr, prefixlen=plen)


def _vxlan_matches(link: Any, want: VxlanDevice, parent: int) -> bool:
    info = link.get("IFLA_LINKINFO")
    if info is None or info.get("IFLA_INFO_KIND") != "vxlan":
        return False
    data = info.get("IFLA_INFO_DATA")
    if data is None:
        return False
    return bool(
        data.get("IFLA_VXLAN_ID") == want.vni
        and data.get("IFLA_VXLAN_PORT") == want.port
        and data.get("IFLA_VXLAN_LOCAL") == want.local_ip
        and data.get("IFLA_VXLAN_LINK") == parent
        and data.get("IFLA_VXLAN_LEARNING") == 0
    )
