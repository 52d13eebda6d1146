"""Routes learned over BGP, as the agent's route calculation consumes them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LearnedRoute:
    """One path to ``prefix`` received from ``peer`` (the peer's IP)."""

    prefix: str
    next_hop: str
    peer: str
    as_path: tuple[int, ...] = ()
    local_pref: int | None = None
    originator_id: str | None = None
    cluster_list: tuple[str, ...] = ()
