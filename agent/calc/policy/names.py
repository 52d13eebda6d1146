"""Names of the chains and ipsets the policy compiler owns. Every name starts with ``podnet-`` and fits the kernel's
limits (iptables chain ≤ 28 characters, ipset ≤ 31); identities that do not fit are hashed."""

from __future__ import annotations

import hashlib
import re

PREFIX = "podnet-"
MAX_CHAIN = 28
MAX_SET = 31
_SAFE = re.compile(r"^[A-Za-z0-9._-]+$")


def digest(text: str, length: int = 16) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def chain(kind: str, ident: str) -> str:
    """``podnet-<kind>-<ident>``, or ``podnet-<kind>-<hash>`` when ``ident`` is long or has odd characters."""
    name = f"{PREFIX}{kind}-{ident}"
    if len(name) <= MAX_CHAIN and _SAFE.match(ident):
        return name
    room = MAX_CHAIN - len(PREFIX) - len(kind) - 1
    return f"{PREFIX}{kind}-{digest(ident, min(room, 16))}"


def ipset(kind: str, canonical: str) -> str:
    """A set named by a hash of what defines its members, so equal definitions share one set."""
    return f"{PREFIX}{kind}-{digest(canonical, min(MAX_SET - len(PREFIX) - len(kind) - 1, 20))}"
