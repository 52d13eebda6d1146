"""A pyroute2 handle on one network namespace (or the agent's own), shared by the route and link writers."""

from __future__ import annotations

from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

__all__ = ["Netlink", "NetlinkError", "ifname"]


class Netlink:
    """Opens lazily; ``netns`` names a namespace under /run/netns (tests run several nodes on one machine)."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._ipr: Any = None

    @property
    def ipr(self) -> Any:
        if self._ipr is None:
            self._ipr = IPRoute(netns=self.netns) if self.netns else IPRoute()
        return self._ipr

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    def index(self, name: str) -> int | None:
        found = self.ipr.link_lookup(ifname=name)
        return int(found[0]) if found else None

    def link(self, index: int) -> Any:
        return self.ipr.link("get", index=index)[0]

    def names(self) -> dict[int, str]:
        return {int(msg["index"]): str(msg.get("ifname")) for msg in self.ipr.link("dump")}

    def link_of_address(self, ip: str) -> int | None:
        """The index of the link carrying ``ip`` (the node's underlay interface)."""
        for msg in self.ipr.addr("dump"):
            if msg.get("IFA_ADDRESS") == ip or msg.get("IFA_LOCAL") == ip:
                return int(msg["index"])
        return None


def ifname(msg: Any) -> str:
    return str(msg.get("ifname") or msg.get("IFLA_IFNAME"))
