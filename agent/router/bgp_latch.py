"""When BGP has caught up after a start. After a (graceful) restart the RIB starts empty while the kernel still
forwards with the routes of the previous run: they are kept until every peer is back and has had ``settle`` seconds
to re-send its routes, or ``startup_grace`` has passed. From then on (it latches) a learned route missing from the
RIB is a real withdrawal. Before that, a prefix BGP delivered in this run and then withdrew goes at once."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Sequence

from bgp.rib import LearnedRoute
from bgp.session import PeerState

log = logging.getLogger(__name__)
UP_STATES = ("Established", "Invalid")  # an Invalid peer (a config no session can be made from) is not waited for


class BgpLatch:
    def __init__(self, node: str, settle: float, startup_grace: float, now: float) -> None:
        self.node = node
        self.settle = settle
        self.startup_grace = startup_grace
        self.started = now
        self.in_sync = False
        self.recheck_at: float | None = None  # when BGP may count as settled: the loop passes again then
        self._all_up_since: float | None = None
        self.seen: set[str] = set()  # prefixes BGP delivered during this run, until BGP is in sync

    def start(self, now: float) -> None:
        """The grace period runs from here."""
        self.started = now

    def check(self, peers: Sequence[PeerState] | None, now: float) -> bool:
        """``peers``: the speaker's peers (None: no speaker yet). True once BGP is in sync (and from then on)."""
        if self.in_sync:
            return True
        all_up = peers is not None and all(p.state in UP_STATES for p in peers)
        if not all_up:
            self._all_up_since = None
        elif self._all_up_since is None:
            self._all_up_since = now
        settled = self._all_up_since is not None and now - self._all_up_since >= self.settle
        if settled or now - self.started >= self.startup_grace:
            self.in_sync = True
            self.recheck_at = None
            log.info("BGP in sync on %s: stale learned routes may now be removed", self.node)
        elif self._all_up_since is not None:
            self.recheck_at = self._all_up_since + self.settle
        else:
            self.recheck_at = self.started + self.startup_grace
        return self.in_sync

    def withdrawn(self, learned: Iterable[LearnedRoute]) -> set[str]:
        """Prefixes BGP delivered in this run and then withdrew: they leave the kernel even before BGP is in sync.
        Once it is, any learned route missing from the RIB goes anyway, so the set is dropped (it would otherwise
        keep every prefix ever learned, borrowed /32s churning with pods, and be diffed on every pass)."""
        if self.in_sync:
            self.seen.clear()
            return set()
        current = {str(ipaddress.ip_network(r.prefix)) for r in learned}
        gone = self.seen - current
        self.seen |= current
        return gone

    def readiness(self, peers: Sequence[PeerState], now: float) -> tuple[bool, str]:
        """Ready the way calico-node's ``-bird-ready`` means it: within ``startup_grace`` of start every configured
        peer Established, after it at least one; no peers: ready."""
        counted = [p for p in peers if p.state != "Invalid"]
        up = sum(1 for p in counted if p.state == "Established")
        if not counted:
            return True, "bgp: no peers configured"
        text = f"bgp: {up} of {len(counted)} peers established"
        if now - self.started < self.startup_grace:
            return up == len(counted), text
        return up > 0, text
