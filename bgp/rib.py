"""Routes learned over BGP, as the agent's route calculation consumes them, and the RIB that holds them.

The RIB keeps every peer's routes (Adj-RIB-In) and picks one best path per prefix. Routes of a peer that went
away with graceful restart negotiated are kept and marked stale until the peer re-sends them and its End-of-RIB,
or until the restart timer ends. Pure: the speaker feeds it and runs the timers.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, replace

from bgp.aspath import AsPath


@dataclass(frozen=True)
class LearnedRoute:
    """One path to ``prefix`` received from ``peer`` (the peer's IP)."""

    prefix: str
    next_hop: str
    peer: str
    as_path: AsPath = ()  # AS numbers, and a tuple for each AS_SET (see bgp.aspath)
    local_pref: int | None = None
    originator_id: str | None = None
    cluster_list: tuple[str, ...] = ()
    stale: bool = False  # kept across the peer's restart (graceful restart), not yet re-learned


def preference(route: LearnedRoute) -> tuple[int, int, int, int, tuple[int, int]]:
    """Sort key, lowest wins: local-pref, AS path length (an AS_SET counts one), cluster list, fresh over stale,
    then lowest peer address."""
    peer = ipaddress.ip_address(route.peer)
    return (
        -(route.local_pref if route.local_pref is not None else 100),
        len(route.as_path),
        len(route.cluster_list),
        int(route.stale),
        (peer.version, int(peer)),
    )


class Rib:
    def __init__(self) -> None:
        self._in: dict[str, dict[str, LearnedRoute]] = {}  # peer -> prefix -> route

    def update(self, peer: str, announced: Iterable[LearnedRoute] = (), withdrawn: Iterable[str] = ()) -> None:
        table = self._in.setdefault(peer, {})
        for prefix in withdrawn:
            table.pop(prefix, None)
        for route in announced:
            table[route.prefix] = replace(route, stale=False)

    def mark_stale(self, peer: str) -> None:
        table = self._in.get(peer, {})
        for prefix, route in table.items():
            table[prefix] = replace(route, stale=True)

    def sweep_stale(self, peer: str) -> int:
        """Drop the peer's routes still stale (its End-of-RIB arrived, or its restart timer ended)."""
        table = self._in.get(peer, {})
        gone = [p for p, r in table.items() if r.stale]
        for prefix in gone:
            del table[prefix]
        return len(gone)

    def has_stale(self, peer: str) -> bool:
        return any(r.stale for r in self._in.get(peer, {}).values())

    def drop_peer(self, peer: str) -> None:
        self._in.pop(peer, None)

    def peers(self) -> list[str]:
        return sorted(self._in)

    def routes_from(self, peer: str) -> dict[str, LearnedRoute]:
        return dict(self._in.get(peer, {}))

    def count(self, peer: str) -> int:
        return len(self._in.get(peer, {}))

    def best_for(self, prefixes: Iterable[str]) -> dict[str, LearnedRoute | None]:
        """The best path of each of ``prefixes`` (None where no peer has one)."""
        out: dict[str, LearnedRoute | None] = {}
        for prefix in prefixes:
            best: LearnedRoute | None = None
            for table in self._in.values():
                route = table.get(prefix)
                if route is not None and (best is None or preference(route) < preference(best)):
                    best = route
            out[prefix] = best
        return out

    def best(self) -> dict[str, LearnedRoute]:
        out: dict[str, LearnedRoute] = {}
        for table in self._in.values():
            for prefix, route in table.items():
                current = out.get(prefix)
                if current is None or preference(route) < preference(current):
                    out[prefix] = route
        return out
