"""ExaBGP's JSON API events (encoder json), decoded into typed values. Pure.

Only what the speaker uses is decoded; anything else (or anything malformed) becomes ``None`` and is ignored by
the caller, so a newer ExaBGP adding fields or event types cannot stop the speaker.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from bgp import aspath
from bgp.rib import LearnedRoute


@dataclass(frozen=True)
class StateEvent:
    peer: str
    state: str  # "up" | "down" | "connected"
    reason: str = ""


@dataclass(frozen=True)
class UpdateEvent:
    peer: str
    announced: tuple[LearnedRoute, ...] = ()
    withdrawn: tuple[str, ...] = ()
    eor: bool = False


@dataclass(frozen=True)
class OpenEvent:
    peer: str
    router_id: str
    graceful_restart_time: int | None  # None: the peer did not advertise graceful restart


@dataclass(frozen=True)
class NotificationEvent:
    peer: str
    direction: str  # "receive" | "send"
    message: str


Event = StateEvent | UpdateEvent | OpenEvent | NotificationEvent


def parse(line: str) -> Event | None:
    try:
        doc = json.loads(line)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    try:
        return _parse(doc)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _peer(doc: dict[str, Any]) -> str:
    return str(doc["neighbor"]["address"]["peer"])


def _parse(doc: dict[str, Any]) -> Event | None:
    kind = doc.get("type")
    if kind == "state":
        n = doc["neighbor"]
        return StateEvent(_peer(doc), str(n["state"]), str(n.get("reason", "")))
    if kind == "update":
        n = doc["neighbor"]
        if n.get("direction", "receive") != "receive":
            return None
        return _update(_peer(doc), n["message"])
    if kind == "open":
        n = doc["neighbor"]
        if n.get("direction") != "receive":
            return None
        o = n["open"]
        gr: int | None = None
        for code, cap in (o.get("capabilities") or {}).items():
            if str(code) == "64" and isinstance(cap, dict):  # graceful restart (RFC 4724)
                gr = int(cap.get("time", 0))
        return OpenEvent(_peer(doc), str(o["router_id"]), gr)
    if kind == "notification":
        n = doc["neighbor"]
        note = n.get("notification") or {}
        message = note.get("message") or f"code {note.get('code')} subcode {note.get('subcode')}"
        return NotificationEvent(_peer(doc), str(n.get("direction", "receive")), str(message))
    return None


def _update(peer: str, message: dict[str, Any]) -> UpdateEvent:
    if "eor" in message:
        return UpdateEvent(peer, eor=True)
    update = message["update"]
    attrs = update.get("attribute") or {}
    withdrawn = [str(n["nlri"]) for f, ns in (update.get("withdraw") or {}).items() if f == "ipv4 unicast" for n in ns]
    try:
        as_path = aspath.from_exabgp(attrs.get("as-path"))
    except (KeyError, TypeError, ValueError):
        as_path = None  # unreadable: its routes are treated as withdrawn (RFC 7606), the rest of the update stands
    local_pref = attrs.get("local-preference")
    originator = attrs.get("originator-id")
    clusters = tuple(str(c) for c in attrs.get("cluster-list") or ())
    announced: list[LearnedRoute] = []
    for family, by_nexthop in (update.get("announce") or {}).items():
        if family != "ipv4 unicast":
            continue
        for next_hop, nlris in by_nexthop.items():
            for nlri in nlris:
                if as_path is None:
                    withdrawn.append(str(nlri["nlri"]))
                    continue
                announced.append(
                    LearnedRoute(
                        prefix=str(nlri["nlri"]),
                        next_hop=str(next_hop),
                        peer=peer,
                        as_path=as_path,
                        local_pref=None if local_pref is None else int(local_pref),
                        originator_id=None if originator is None else str(originator),
                        cluster_list=clusters,
                    )
                )
    return UpdateEvent(peer, tuple(announced), tuple(withdrawn))
