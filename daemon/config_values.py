"""The kinds of value an agent option takes: how each is parsed (from a flag or an environment variable, always
text, and from the YAML config file, which may also give numbers, booleans and lists), shown to a person, and
written as JSON. A parse failure raises ``ValueError`` whose message quotes the value; the caller adds the source.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon import autodetect

JsonValue = Any  # str | int | float | bool | None | list[JsonValue]: what ``json.dumps`` takes

_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
# RFC 1123 subdomain, as Kubernetes requires of node names.
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_SUBDOMAIN = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")
_HOSTNAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*")


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not {what}")
    return value.strip()


def parse_duration(value: object) -> float:
    """Seconds from "30s", "5m", "1h30m", "250ms", or a plain number of seconds (text or YAML number)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = _text(value, "a duration")
        try:
            seconds = float(text)
        except ValueError:
            if not text or _DURATION.sub("", text) != "":
                raise ValueError(f"{value!r} is not a duration (e.g. 30s, 5m, 1h30m or a number of seconds)") from None
            seconds = sum(float(n) * _UNITS[unit] for n, unit in _DURATION.findall(text))
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{value!r} is not a duration (negative or not finite)")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest way back: 300 -> "5m", 90 -> "1m30s", 0.5 -> "500ms", 2.5 -> "2.5s"."""
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    whole = int(seconds)
    if whole != seconds:
        return f"{seconds:g}s"
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(hours, "h"), (minutes, "m"), (secs, "s")]
    return "".join(f"{n}{unit}" for n, unit in parts if n)


def parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = _text(value, "true or false").lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"{value!r} is not true or false")


class Kind:
    """How one option's values are read and shown. Subclasses set ``metavar`` and implement ``parse``."""

    metavar = "VALUE"
    describe = ""  # what the docs' table says the value is

    def parse(self, value: object) -> Any:
        raise NotImplementedError

    def show(self, value: Any) -> str:
        return "" if value is None else str(value)

    def to_json(self, value: Any) -> JsonValue:
        return None if value is None else str(value)


@dataclass(frozen=True)
class Text(Kind):
    describe: str = "text"
    metavar: str = "TEXT"

    def parse(self, value: object) -> str:
        text = _text(value, "text")
        if not text:
            raise ValueError("an empty value")
        return text


@dataclass(frozen=True)
class NodeName(Kind):
    describe: str = "DNS subdomain (lowercase)"
    metavar: str = "NAME"

    def parse(self, value: object) -> str:
        text = _text(value, "a node name")
        if len(text) > 253 or not _SUBDOMAIN.fullmatch(text):
            raise ValueError(f"{text!r} is not a valid node name (lowercase RFC 1123 subdomain, as Kubernetes)")
        return text


@dataclass(frozen=True)
class Bool(Kind):
    describe: str = "true/false"
    metavar: str = "BOOL"

    def parse(self, value: object) -> bool:
        return parse_bool(value)

    def show(self, value: Any) -> str:
        return "true" if value else "false"

    def to_json(self, value: Any) -> JsonValue:
        return bool(value)


@dataclass(frozen=True)
class Duration(Kind):
    """Seconds; ``whole``: an integer number of seconds (lease TTLs, BGP timers)."""

    lo: float = 0.0
    hi: float = math.inf
    lo_open: bool = True  # the lower bound itself is not allowed (most timers must be positive)
    whole: bool = False
    describe: str = "duration"
    metavar: str = "DURATION"

    def parse(self, value: object) -> float | int:
        seconds = parse_duration(value)
        if self.whole and seconds != int(seconds):
            raise ValueError(f"{value!r} is not a whole number of seconds")
        if seconds < self.lo or (self.lo_open and seconds == self.lo) or seconds > self.hi:
            low = f"more than {format_duration(self.lo)}" if self.lo_open else f"at least {format_duration(self.lo)}"
            high = f" and at most {format_duration(self.hi)}" if math.isfinite(self.hi) else ""
            raise ValueError(f"{value!r} is out of range (must be {low}{high})")
        return int(seconds) if self.whole else seconds

    def show(self, value: Any) -> str:
        return format_duration(float(value))

    def to_json(self, value: Any) -> JsonValue:
        return value  # seconds: a config file takes numbers as seconds


@dataclass(frozen=True)
class Number(Kind):
    """A positive number (not a duration: a rate or a factor)."""

    describe: str = "positive number"
    metavar: str = "NUMBER"

    def parse(self, value: object) -> float:
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not a number")
        try:
            number = float(value) if isinstance(value, int | float) else float(_text(value, "a number"))
        except ValueError:
            raise ValueError(f"{value!r} is not a number") from None
        if not (math.isfinite(number) and number > 0):
            raise ValueError(f"{value!r} is not a positive number")
        return number

    def show(self, value: Any) -> str:
        return f"{value:g}"

    def to_json(self, value: Any) -> JsonValue:
        return value


@dataclass(frozen=True)
class Integer(Kind):
    lo: int = 0
    hi: int = 2**63
    optional: bool = False  # None (unset) is a value: "" from a flag or the file
    describe: str = "integer"
    metavar: str = "N"

    def parse(self, value: object) -> int | None:
        if self.optional and (value is None or value == ""):
            return None
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not an integer")
        if isinstance(value, int):
            number = value
        else:
            text = _text(value, "an integer")
            if not re.fullmatch(r"[0-9]+", text):
                raise ValueError(f"{value!r} is not an integer")
            number = int(text)
        if not self.lo <= number <= self.hi:
            raise ValueError(f"{number} is out of range ({self.lo}..{self.hi})")
        return number

    def to_json(self, value: Any) -> JsonValue:
        return value


@dataclass(frozen=True)
class Choice(Kind):
    choices: tuple[str, ...] = ()
    upper: bool = False  # stored in capitals (ExaBGP's levels); matched case-insensitively either way
    describe: str = ""
    metavar: str = ""

    def parse(self, value: object) -> str:
        text = _text(value, f"one of {', '.join(self.choices)}")
        text = text.upper() if self.upper else text.lower()
        if text not in self.choices:
            raise ValueError(f"{value!r} is not one of {', '.join(self.choices)}")
        return text


@dataclass(frozen=True)
class AbsolutePath(Kind):
    optional: bool = False
    describe: str = "absolute path"
    metavar: str = "PATH"

    def parse(self, value: object) -> Path | None:
        text = _text(value, "a path")
        if not text:
            if self.optional:
                return None
            raise ValueError("an empty path")
        if not text.startswith("/"):
            raise ValueError(f"{text!r} is not an absolute path")
        return Path(text)


@dataclass(frozen=True)
class OptionalText(Kind):
    describe: str = "text"
    metavar: str = "TEXT"

    def parse(self, value: object) -> str | None:
        text = _text(value, "text")
        return text or None


def _port(text: str, what: str) -> int:
    if not re.fullmatch(r"[0-9]{1,5}", text) or int(text) > 65535:
        raise ValueError(f"{what!r}: {text!r} is not a port (0..65535)")
    return int(text)


def _endpoint(item: str) -> str:
    rest = item
    for scheme in ("http://", "https://"):
        if rest.startswith(scheme):
            rest = rest[len(scheme) :]
    host, sep, port = rest.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{item!r} is not an etcd endpoint (HOST:PORT, optionally http:// or https://)")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{item!r}: {host} is not an IPv6 address") from None
    elif not _HOSTNAME.fullmatch(host):
        raise ValueError(f"{item!r}: {host!r} is not a host name or address")
    if _port(port, item) == 0:
        raise ValueError(f"{item!r}: port 0")
    return item


@dataclass(frozen=True)
class Endpoints(Kind):
    """etcd endpoints: a comma-separated list (flag, environment, file) or a YAML list (file)."""

    describe: str = "list of HOST:PORT"
    metavar: str = "HOST:PORT[,HOST:PORT…]"

    def parse(self, value: object) -> tuple[str, ...]:
        if isinstance(value, list | tuple):
            items = [_text(v, "an endpoint (HOST:PORT)") for v in value]
        else:
            items = [p.strip() for p in _text(value, "a list of endpoints").split(",")]
        items = [i for i in items if i]
        if not items:
            raise ValueError("no endpoint given (at least one HOST:PORT)")
        return tuple(_endpoint(i) for i in items)

    def show(self, value: Any) -> str:
        return ",".join(value)

    def to_json(self, value: Any) -> JsonValue:
        return list(value)


@dataclass(frozen=True)
class BindAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class HostPort(Kind):
    """Where to listen: ``IP:PORT`` (``[IPv6]:PORT``); port 0 takes any free port."""

    describe: str = "IP:PORT"
    metavar: str = "IP:PORT"

    def parse(self, value: object) -> BindAddress:
        text = _text(value, "an address to listen on (IP:PORT)")
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r} is not IP:PORT")
        bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            ip = ipaddress.ip_address(bare)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
        if ip.version == 6 and bare == host:
            raise ValueError(f"{text!r}: write an IPv6 address in brackets, [{host}]:{port}")
        return BindAddress(str(ip), _port(port, text))


@dataclass(frozen=True)
class NodeIP(Kind):
    describe: str = "method or IPv4 address"
    metavar: str = "METHOD"

    def parse(self, value: object) -> autodetect.Method:
        return autodetect.parse_method(_text(value, "an autodetection method"))


def suggest(word: str, candidates: Sequence[str]) -> str | None:
    """The candidate ``word`` was probably meant to be (same letters ignoring case and separators, else close)."""
    import difflib  # only on the error path

    def norm(s: str) -> str:
        return re.sub(r"[-_.]", "", s).lower()

    by_norm = {norm(c): c for c in candidates}
    if norm(word) in by_norm:
        return by_norm[norm(word)]
    close = difflib.get_close_matches(norm(word), list(by_norm), n=1, cutoff=0.75)
    return by_norm[close[0]] if close else None
