"""Peer sessions as operators see them: the published state, and the speaker's per-session bookkeeping."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

from datastore.model import BGPPeerStatus

ESTABLISHED = "Established"


@dataclass(frozen=True)
class PeerState:
    """One peer as operators see it (``agentctl status``)."""

    address: str
    kind: str
    name: str
    state: str  # Idle, Connect, Active, OpenSent, Established; or "Invalid" for a peer with a config error
    since: str  # ISO 8601, UTC
    info: str
    as_number: int
    prefixes_received: int = 0
    prefixes_sent: int = 0

    def to_status(self, node: str) -> BGPPeerStatus:
        return BGPPeerStatus(
            node=node,
            peer_ip=self.address,
            peer_type=self.kind,
            state=self.state,
            since=self.since,
            info=self.info,
            as_number=self.as_number,
            prefixes_received=self.prefixes_received,
            prefixes_sent=self.prefixes_sent,
        )


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


@dataclass
class Session:
    state: str = "Active"
    since: str = field(default_factory=now_iso)
    info: str = ""
    stale_until: float | None = None  # monotonic deadline of the peer's graceful-restart timer
    md5_baseline: tuple[int, int] = (0, 0)
    # The configuration generation this session was (re)created in, until ExaBGP has reloaded it: until then
    # the session ExaBGP reports is the old one, and an "up" for it says nothing about the new one.
    awaiting_reload: int | None = None
    event_seq: int = 0  # stream position of the last state event applied (a snapshot read before it is stale)

    def set(self, state: str, info: str = "") -> None:
        if state != self.state:
            self.since = now_iso()
        self.state = state
        self.info = info


def md5_failures(pid: int | None) -> tuple[int, int]:
    """TCP-MD5 segments the kernel dropped in the namespace of process ``pid``: (bad or missing signature — what
    a peer we hold a key for causes; signed but we hold no key — what a peer we hold none for causes)."""
    if pid is None:
        return (0, 0)
    try:
        lines = Path(f"/proc/{pid}/net/netstat").read_text().splitlines()
    except OSError:
        return (0, 0)
    for head, values in zip(lines[::2], lines[1::2], strict=False):
        if head.startswith("TcpExt:"):
            t = {k: int(v) for k, v in zip(head.split()[1:], values.split()[1:], strict=False)}
            return (t.get("TCPMD5Failure", 0) + t.get("TCPMD5NotFound", 0), t.get("TCPMD5Unexpected", 0))
    return (0, 0)
