"""Typed readers for JSON objects: each returns the value or raises ``ModelError`` naming the field and the problem."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any


class ModelError(ValueError):
    """A stored value that does not parse or validate. Consumers treat the key as missing."""


JsonObject = Mapping[str, Any]


def obj(value: Any, where: str) -> JsonObject:
    if not isinstance(value, dict):
        raise ModelError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def string(d: JsonObject, name: str, default: str | None = None) -> str:
    """A string field; required unless a default is given."""
    v = d.get(name)
    if v is None:
        if default is None:
            raise ModelError(f"{name}: required")
        return default
    if not isinstance(v, str):
        raise ModelError(f"{name}: expected a string, got {type(v).__name__}")
    return v


def opt_string(d: JsonObject, name: str) -> str | None:
    v = d.get(name)
    if v is None:
        return None
    if not isinstance(v, str):
        raise ModelError(f"{name}: expected a string, got {type(v).__name__}")
    return v


def integer(d: JsonObject, name: str, default: int | None = None, lo: int | None = None, hi: int | None = None) -> int:
    """An integer field (booleans refused); required unless a default is given."""
    v = d.get(name)
    if v is None:
        if default is None:
            raise ModelError(f"{name}: required")
        v = default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ModelError(f"{name}: expected an integer, got {type(v).__name__}")
    if lo is not None and v < lo:
        raise ModelError(f"{name}: {v} is below {lo}")
    if hi is not None and v > hi:
        raise ModelError(f"{name}: {v} is above {hi}")
    return v


def opt_integer(d: JsonObject, name: str, lo: int | None = None, hi: int | None = None) -> int | None:
    if d.get(name) is None:
        return None
    return integer(d, name, lo=lo, hi=hi)


def boolean(d: JsonObject, name: str, default: bool = False) -> bool:
    v = d.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ModelError(f"{name}: expected true or false, got {type(v).__name__}")
    return v


def choice(d: JsonObject, name: str, options: tuple[str, ...], default: str | None = None) -> str:
    v = string(d, name, default)
    if v not in options:
        raise ModelError(f"{name}: {v!r} is not one of {', '.join(options)}")
    return v


def labels(d: JsonObject, name: str) -> dict[str, str]:
    v = d.get(name)
    if v is None:
        return {}
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        raise ModelError(f"{name}: expected an object of string to string")
    return dict(v)


def string_list(d: JsonObject, name: str) -> tuple[str, ...]:
    v = d.get(name)
    if v is None:
        return ()
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ModelError(f"{name}: expected a list of strings")
    return tuple(v)


def obj_list(d: JsonObject, name: str) -> list[JsonObject]:
    v = d.get(name)
    if v is None:
        return []
    if not isinstance(v, list):
        raise ModelError(f"{name}: expected a list")
    return [obj(x, f"{name}[{i}]") for i, x in enumerate(v)]


def ip(value: str, where: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ModelError(f"{where}: {value!r} is not an IP address") from None


def cidr(value: str, where: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=True))
    except ValueError as exc:
        raise ModelError(f"{where}: {value!r} is not a CIDR ({exc})") from None


def interface(value: str, where: str) -> str:
    """An address with its prefix length, e.g. the node's underlay ``192.168.77.11/24``."""
    try:
        return str(ipaddress.ip_interface(value))
    except ValueError:
        raise ModelError(f"{where}: {value!r} is not an address/prefix") from None
