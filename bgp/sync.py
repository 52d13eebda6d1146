"""Pure helpers of the speaker's worker: the commands that take ExaBGP from what it was sent to what is desired,
and the reading of ``show neighbor json``."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import replace

from bgp import commands
from bgp.commands import OutRoute
from bgp.plan import PeerSpec

log = logging.getLogger(__name__)


def session_fields(spec: PeerSpec) -> PeerSpec:
    """The parts of a peer that ExaBGP's session depends on (the rest is our own policy)."""
    return replace(spec, accept_routes=True, kind="", name="", rr_client=False)


def parse_neighbors(text: Sequence[str]) -> dict[str, bool] | None:
    try:
        doc = json.loads("\n".join(text))
        return {str(n["peer"]["address"]): str(n.get("fsm", "")).lower() == "established" for n in doc}
    except (ValueError, KeyError, TypeError):
        return None


Update = tuple[str, str, OutRoute | None]


def diff(
    desired: dict[str, dict[str, OutRoute]],
    sent: dict[str, dict[str, OutRoute]],
    unsure: dict[str, set[str]],
) -> list[tuple[str, list[Update]]]:
    """Commands that take ExaBGP from ``sent`` to ``desired``, one per distinct route (to all the peers that need
    it) and one per withdrawn prefix."""
    announces: dict[OutRoute, list[str]] = {}
    withdraws: dict[str, list[str]] = {}
    for address, routes in desired.items():
        have = sent.get(address, {})
        for prefix, route in routes.items():
            if have.get(prefix) != route:
                announces.setdefault(route, []).append(address)
        maybe = set(have) | unsure.get(address, set())
        for prefix in maybe - set(routes):
            withdraws.setdefault(prefix, []).append(address)
    out: list[tuple[str, list[Update]]] = []
    for prefix, addresses in sorted(withdraws.items()):
        out.append((commands.withdraw(sorted(addresses), prefix), [(a, prefix, None) for a in addresses]))
    for route, addresses in sorted(announces.items(), key=lambda kv: (kv[0].prefix, kv[1])):
        try:
            line = commands.announce(sorted(addresses), route)
        except commands.CommandError as exc:  # e.g. a learned route we cannot reflect: skip it, not the rest
            log.warning("not announcing %s to %s: %s", route.prefix, ", ".join(sorted(addresses)), exc)
            continue
        out.append((line, [(a, route.prefix, route) for a in addresses]))
    return out
