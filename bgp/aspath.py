"""AS_PATH as podnet keeps it: decoded from ExaBGP's JSON, checked, and written back in ExaBGP's command syntax.
Pure.

A path is a tuple whose items are AS numbers (the members of AS_SEQUENCE segments, in order) or tuples of AS
numbers (one AS_SET each, RFC 4271 section 4.3). ``len(path)`` is then exactly the path length best-path
selection compares: an AS_SET counts as one (RFC 4271 section 9.1.2.2).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

AsPath = tuple[int | tuple[int, ...], ...]

MAX_ASN = 2**32 - 1


def from_exabgp(value: Any) -> AsPath:
    """The ``as-path`` attribute of an ExaBGP update event. Raises ValueError when it is malformed.

    ExaBGP 5 writes an object keyed by segment position: ``{"0": {"element": "as-sequence", "value": [...]},
    "1": {"element": "as-set", "value": [...]}}`` (it labels confederation segments "as-sequence" too; podnet
    uses no confederations). ExaBGP 4 wrote a list with each AS_SET as a nested list: ``[65001, [65002, 65003]]``.
    """
    if value is None:
        return ()
    if isinstance(value, dict):
        out: list[int | tuple[int, ...]] = []
        for _, segment in sorted(value.items(), key=lambda kv: int(kv[0])):
            kind, members = segment["element"], segment["value"]
            if not isinstance(members, list):
                raise ValueError(f"AS_PATH segment is not a list: {members!r}")
            if kind == "as-sequence":
                out.extend(_asn(a) for a in members)
            elif kind == "as-set":
                out.append(tuple(_asn(a) for a in members))
            else:
                raise ValueError(f"unknown AS_PATH segment type {kind!r}")
        return tuple(out)
    if isinstance(value, list):
        return tuple(tuple(_asn(a) for a in item) if isinstance(item, list) else _asn(item) for item in value)
    raise ValueError(f"AS_PATH is neither an object nor a list: {value!r}")


def _asn(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ASN:
        raise ValueError(f"not an AS number: {value!r}")
    return value


def asns(path: AsPath) -> Iterator[int]:
    """Every AS number on the path, sets included."""
    for item in path:
        if isinstance(item, tuple):
            yield from item
        else:
            yield item


def to_command(path: AsPath) -> str:
    """ExaBGP's API syntax: ``[ 64600 65010 ] ( 65021 65022 )`` (a sequence in brackets, a set in parentheses).
    Raises ValueError for AS 0, which must never be sent (RFC 7607), or an empty set."""
    parts: list[str] = []
    run: list[int] = []
    for item in path:
        if isinstance(item, tuple):
            if run:
                parts.append(f"[ {' '.join(map(str, run))} ]")
                run = []
            if not item:
                raise ValueError("empty AS_SET")
            parts.append(f"( {' '.join(map(str, item))} )")
        else:
            run.append(item)
    if run:
        parts.append(f"[ {' '.join(map(str, run))} ]")
    if any(not 0 < a <= MAX_ASN for a in asns(path)):
        raise ValueError(f"AS_PATH with an invalid AS number: {path!r}")
    return " ".join(parts)


def render(path: AsPath) -> str:
    """For people: ``64600 65010 {65021,65022}`` (BIRD's and GoBGP's notation)."""
    return " ".join("{" + ",".join(map(str, i)) + "}" if isinstance(i, tuple) else str(i) for i in path)
