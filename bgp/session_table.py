"""What the speaker knows and wants: configured peers, their sessions, the RIB of learned routes, what ExaBGP has
been told to announce, and the graceful-restart timers. No threads and no lock of its own: the speaker's lock is
held around every call (``Speaker`` owns it); ``kick`` wakes the speaker's worker.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from collections.abc import Callable, Iterable

from bgp import aspath, events
from bgp.commands import OutRoute
from bgp.outbound import POLICY, refusal
from bgp.plan import PeerSpec, SpeakerIdentity
from bgp.rib import LearnedRoute, Rib
from bgp.session import ESTABLISHED, PeerState, Session
from bgp.sync import session_fields

log = logging.getLogger("bgp.speaker")  # the speaker's messages, under the name operators filter on

REFRESH_GRACE = 5.0  # after a bridge restart: how long peers get to re-send their routes on route refresh
_HOLD_EXPIRED = re.compile(r"hold.?tim|\(4,\s*0\)|code 4\b", re.IGNORECASE)


class SessionTable:
    def __init__(self, identity: SpeakerIdentity, kick: Callable[[], None]) -> None:
        self.identity = identity
        self.kick = kick
        self.peers: dict[str, PeerSpec] = {}
        self.invalid: list[PeerSpec] = []
        self.own: frozenset[str] = frozenset()
        self.rib = Rib()
        self.router_ids: dict[str, str] = {}
        self.peer_gr: dict[str, int | None] = {}
        self.sessions: dict[str, Session] = {}
        self.sent: dict[str, dict[str, OutRoute]] = {}
        self.unsure: dict[str, set[str]] = {}  # prefixes ExaBGP may hold for a peer (after a bridge restart)
        self.eor_pending: set[str] = set()
        self.refresh_pending: set[str] = set()
        self.reload_pending = False
        self.resync_pending = False
        self.config_generation = 0  # bumped by each configuration file change
        self.reload_generation = 0  # the configuration the reload in flight makes ExaBGP read (at least)
        self.line_seq = itertools.count(1)  # positions of the lines read from bridges, in arrival order
        self.rejected: dict[str, dict[str, int]] = {}  # reason -> peer -> routes refused on receipt
        self.last_best: dict[str, LearnedRoute] = {}
        self.own_version = 0  # bumped by each change of our own prefixes
        self.own_handed = 0  # the latest version the worker has started sending to ExaBGP

    # ---- configuration ---------------------------------------------------------------------------------------

    def set_peers(self, peers: list[PeerSpec], md5_baseline: tuple[int, int]) -> tuple[bool, bool, list[str]]:
        """Take the complete peer set. Returns (anything to do, best paths changed, re-created sessions)."""
        new = {p.address: p for p in peers if p.ok}
        invalid = [p for p in peers if not p.ok]
        if new == self.peers and invalid == self.invalid:
            return False, False, []  # the common case: nothing to render, compare or log
        changed = False
        recreated: list[str] = []
        for p in invalid:
            if p not in self.invalid:
                log.warning("BGP peer %s (%s) of %s not configured: %s", p.address, p.name, self.identity.node, p.error)
        self.invalid = invalid
        for address in set(self.peers) - set(new):
            self.rib.drop_peer(address)
            for table in (self.sessions, self.sent, self.unsure, self.router_ids, self.peer_gr):
                table.pop(address, None)
            self.eor_pending.discard(address)
            changed = True
        for address, spec in new.items():
            old = self.peers.get(address)
            if old == spec:
                continue
            if old is not None and session_fields(old) == session_fields(spec):
                # Only our import policy changed: the session stays; drop or re-ask for the peer's routes.
                if not spec.accept_routes:
                    self.rib.drop_peer(address)
                    changed = True
                elif self.sessions.get(address, Session()).state == ESTABLISHED:
                    self.refresh_pending.add(address)
                continue
            self.sessions[address] = Session(md5_baseline=md5_baseline)
            recreated.append(address)
            if old is not None:
                # ExaBGP re-creates a changed neighbor, and its Adj-RIB-Out may go with it: send it all again
                # (after the reload, which ExaBGP runs before it reads our next command).
                self.unsure.setdefault(address, set()).update(self.sent.pop(address, {}))
        self.peers = new
        if changed:
            self.best_changed()
        return True, changed, recreated

    def set_own(self, own: frozenset[str]) -> bool:
        """Take our own prefixes; whether they changed."""
        if own == self.own:
            return False
        self.own = own
        self.own_version += 1
        return True

    # ---- what ExaBGP and the bridge report -------------------------------------------------------------------

    def reload_acked(self) -> None:
        """ExaBGP acked ``reload``: it re-reads its file before it reads our next command, so the sessions it
        reports from now on are the reloaded ones."""
        for s in self.sessions.values():
            if s.awaiting_reload is not None and s.awaiting_reload <= self.reload_generation:
                s.awaiting_reload = None

    def bridge_restarted(self) -> None:
        """Only the bridge restarted: events may have been lost with it. Re-send everything, ask established
        peers to re-send theirs, and drop what they do not confirm within the grace period."""
        now = time.monotonic()
        for address, routes in self.sent.items():
            self.unsure.setdefault(address, set()).update(routes)
        self.sent.clear()
        for address, s in self.sessions.items():
            if s.state == ESTABLISHED:
                self.refresh_pending.add(address)
                if self.rib.count(address):
                    self.rib.mark_stale(address)
                    s.stale_until = now + REFRESH_GRACE
        self.resync_pending = True  # and learn the sessions' states again (show neighbor)

    def exabgp_started(self) -> None:
        self.reload_pending = False  # a fresh process reads the current file
        for s in self.sessions.values():
            s.awaiting_reload = None

    def exabgp_failed(self, why: str) -> None:
        for s in self.sessions.values():
            s.set("Idle", why)

    def exabgp_lost(self, why: str) -> None:
        """ExaBGP died: it forgot everything we told it; we keep learned routes for the graceful-restart time."""
        self.sent.clear()
        self.unsure.clear()
        self.eor_pending.clear()
        now = time.monotonic()
        for address, spec in self.peers.items():
            s = self.sessions.setdefault(address, Session())
            s.set("Idle", why)
            self.hold_or_drop(address, spec.graceful_restart_time, now)

    def apply(self, event: events.Event, seq: int | None = None) -> bool:
        """Apply one event; ``seq`` is its position in the bridge stream. Whether the owner should be told."""
        spec = self.peers.get(event.peer)
        if spec is None:
            return False
        s = self.sessions.setdefault(event.peer, Session())
        now = time.monotonic()
        if isinstance(event, events.StateEvent):
            s.event_seq = next(self.line_seq) if seq is None else seq
            if event.state in ("up", "connected") and s.awaiting_reload is not None:
                # the session of the configuration we replaced (ExaBGP has not reloaded yet): not this one
                log.debug("%s: ignoring %r of %s from before the reload", self.identity.node, event.state, event.peer)
                return False
            if event.state == "up":
                s.set(ESTABLISHED)
                self.eor_pending.add(event.peer)
            elif event.state == "connected":
                s.set("OpenSent")
            elif event.state == "down":
                s.set("Active" if not spec.passive else "Idle", event.reason or s.info)
                if self.rib.count(event.peer):
                    # A peer that stopped answering (hold timer expired) is gone, not restarting: graceful
                    # restart only covers a session that closed (RFC 4724 section 4.2).
                    silent = _HOLD_EXPIRED.search(f"{event.reason} {s.info}") is not None
                    self.hold_or_drop(event.peer, None if silent else self.peer_gr.get(event.peer), now)
            self.kick()
            return True
        if isinstance(event, events.OpenEvent):
            self.router_ids[event.peer] = event.router_id
            self.peer_gr[event.peer] = event.graceful_restart_time
            return False
        if isinstance(event, events.NotificationEvent):
            who = "peer sent" if event.direction == "receive" else "we sent"
            s.info = f"{who} NOTIFICATION: {event.message}"
            return True
        touched: list[str] | None = None  # None: recompute every prefix
        if event.eor:
            self.rib.sweep_stale(event.peer)
            s.stale_until = None
        else:
            ok, refused = [], []
            for r in event.announced:
                why = refusal(self.identity, spec, r)
                if why is None and r.next_hop == self.identity.router_id:
                    why = "own-next-hop"
                if why is None:
                    ok.append(r)
                    continue
                refused.append(r.prefix)
                if why != POLICY:
                    self._count_rejected(why, event.peer, r)
            self.rib.update(event.peer, ok, [*event.withdrawn, *refused])
            touched = [*event.withdrawn, *(r.prefix for r in event.announced)]
        if self.identity.cluster_id is not None:
            self.kick()  # reflect
        return self.best_changed(touched)

    def apply_snapshot(self, seen: dict[str, bool], snapshot_seq: int) -> None:
        """Session states from ``show neighbor`` after a bridge restart (state events may have been lost with the
        old bridge). Events are the truth: a session whose last state event came after the snapshot was written
        keeps it, and one not yet reloaded by ExaBGP is not the session the snapshot shows. Otherwise a snapshot
        written before ExaBGP tore a session down could mark it up after the "down" event was applied."""
        for address, up in seen.items():
            s = self.sessions.setdefault(address, Session())
            if s.event_seq > snapshot_seq or s.awaiting_reload is not None:
                continue
            if up and s.state != ESTABLISHED:
                s.set(ESTABLISHED)
            elif not up and s.state == ESTABLISHED:
                s.set("Active")

    def _count_rejected(self, why: str, peer: str, route: LearnedRoute) -> None:
        by_peer = self.rejected.setdefault(why, {})
        by_peer[peer] = by_peer.get(peer, 0) + 1
        if by_peer[peer] == 1 or log.isEnabledFor(logging.DEBUG):
            log.warning(
                "%s: refused %s from %s (%s; AS_PATH %s); further ones are counted",
                self.identity.node,
                route.prefix,
                peer,
                why,
                aspath.render(route.as_path) or "empty",
            )

    # ---- graceful restart and best paths ---------------------------------------------------------------------

    def hold_or_drop(self, address: str, restart_time: int | None, now: float) -> None:
        if restart_time and self.sessions[address].stale_until is not None:
            return  # already waiting for this peer: more failed attempts do not extend its restart time
        if restart_time and self.rib.count(address):
            self.rib.mark_stale(address)
            self.sessions[address].stale_until = now + restart_time
        else:
            self.rib.drop_peer(address)
            self.sessions[address].stale_until = None
        # Keep the last-reported best paths in step with the RIB, so identical routes learned again later are
        # reported as a change.
        self.best_changed()

    def expire_stale(self, now: float) -> tuple[bool, float | None]:
        """Drop stale routes whose restart time ended: (best paths changed, the next deadline)."""
        changed = False
        next_deadline: float | None = None
        for address, s in self.sessions.items():
            if s.stale_until is None:
                continue
            if now >= s.stale_until:
                self.rib.sweep_stale(address)
                s.stale_until = None
                changed = True
            else:
                next_deadline = min(next_deadline or s.stale_until, s.stale_until)
        return (self.best_changed() if changed else False), next_deadline

    def best_changed(self, prefixes: Iterable[str] | None = None) -> bool:
        """Whether the best paths changed (only ``prefixes`` looked at, when given: updates touch few)."""
        if prefixes is None:
            best = self.rib.best()
            if best == self.last_best:
                return False
            self.last_best = best
            return True
        changed = False
        for prefix, route in self.rib.best_for(prefixes).items():
            if self.last_best.get(prefix) != route:
                changed = True
                if route is None:
                    del self.last_best[prefix]
                else:
                    self.last_best[prefix] = route
        return changed

    # ---- what was sent ---------------------------------------------------------------------------------------

    def record_sent(self, updates: Iterable[tuple[str, str, OutRoute | None]]) -> None:
        """ExaBGP acked these announcements (route) and withdrawals (None)."""
        for address, prefix, route in updates:
            if address not in self.peers:
                continue
            self.unsure.get(address, set()).discard(prefix)
            table = self.sent.setdefault(address, {})
            if route is None:
                table.pop(prefix, None)
            else:
                table[prefix] = route

    def take_eors(self) -> list[str]:
        eors = sorted(a for a in self.eor_pending if self.sessions.get(a, Session()).state == ESTABLISHED)
        self.eor_pending.clear()
        return eors

    def take_refreshes(self) -> list[str]:
        refresh = sorted(self.refresh_pending)
        self.refresh_pending.clear()
        return refresh

    # ---- status ----------------------------------------------------------------------------------------------

    def peer_states(self, md5: tuple[int, int]) -> list[PeerState]:
        out: list[PeerState] = []
        for address, spec in sorted(self.peers.items()):
            s = self.sessions.setdefault(address, Session())
            info = s.info
            # The kernel counts per namespace, not per peer: blame only sessions that are down and whose
            # configuration matches the kind of failure.
            keyed = spec.password is not None
            dropped = md5[0] - s.md5_baseline[0] if keyed else md5[1] - s.md5_baseline[1]
            if s.state != ESTABLISHED and dropped > 0:
                what = "with a bad or missing signature" if keyed else "signed, but no password is configured"
                info = f"TCP-MD5 authentication failing: {dropped} segment(s) {what}" + (f"; {info}" if info else "")
            out.append(
                PeerState(
                    address=address,
                    kind=spec.kind,
                    name=spec.name,
                    state=s.state,
                    since=s.since,
                    info=info,
                    as_number=spec.as_number,
                    prefixes_received=self.rib.count(address),
                    prefixes_sent=len(self.sent.get(address, {})),
                )
            )
        for spec in self.invalid:
            out.append(PeerState(spec.address, spec.kind, spec.name, "Invalid", "", spec.error or "", spec.as_number))
        return out

    def established(self) -> int:
        return sum(1 for a in self.peers if self.sessions.get(a, Session()).state == ESTABLISHED)
