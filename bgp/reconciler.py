"""The speaker's worker thread: takes ExaBGP from what it was told to what the session table wants (reload after a
peer change, announcements and withdrawals, End-of-RIBs, route refreshes) and expires graceful-restart timers.
One command at a time over the bridge; the speaker's lock is taken only around reading and updating the table."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from bgp import commands
from bgp.link import BridgeLink, BridgeLost
from bgp.outbound import outbound
from bgp.session_table import SessionTable
from bgp.sync import diff, parse_neighbors

log = logging.getLogger("bgp.speaker")  # the speaker's messages, under the name operators filter on
trace = logging.getLogger("podnet.trace.bgp")

RELOAD_TIMEOUT = 10.0
RETRY_DELAY = 0.5
IDLE = 1.0  # the longest the worker sleeps: it reports progress at least this often


@dataclass(frozen=True)
class WorkerHooks:
    """What the worker needs from the speaker (called with the speaker's lock held)."""

    running: Callable[[], bool]
    ready_link: Callable[[], BridgeLink | None]  # the current ExaBGP's bridge once it said hello (else None)
    link_lost: Callable[[BridgeLink], None]
    beat: Callable[[], None]  # a round of the loop
    changed: Callable[[], None]  # tell the owner (called without the lock)


class Worker:
    def __init__(self, table: SessionTable, wake: threading.Condition, host: WorkerHooks) -> None:
        self.table = table
        self.wake = wake  # the speaker's lock, and the worker's wake-up call
        self.host = host
        self.dirty = True  # the worker has something to look at

    def kick(self) -> None:
        """Wake the worker (hold the lock)."""
        self.dirty = True
        self.wake.notify_all()

    def run(self) -> None:
        while True:
            with self.wake:
                self.host.beat()
                if not self.host.running():
                    return
                conn = self.host.ready_link()
                if conn is None:
                    self.wake.wait(timeout=0.5)
                    continue
                self.dirty = False
            try:
                idle = self.step(conn)
            except BridgeLost:
                with self.wake:
                    self.host.link_lost(conn)
                continue
            except Exception:
                log.exception("BGP speaker worker step failed")
                idle = IDLE
            with self.wake:
                if self.host.running() and idle > 0 and not self.dirty:
                    self.wake.wait(timeout=idle)

    def step(self, conn: BridgeLink) -> float:
        """One round: reload if the peers changed, sync announcements, send End-of-RIBs and refreshes, expire
        stale routes. Returns how long to sleep (0: there may be more to do)."""
        t = self.table
        with self.wake:
            reload, resync = t.reload_pending, t.resync_pending
            t.reload_pending = t.resync_pending = False
        if reload or resync:
            self.reload(conn, resync)
        with self.wake:
            desired = outbound(t.identity, t.peers.values(), t.own, t.rib, t.router_ids)
            plan = diff(desired, t.sent, t.unsure)
            taken = t.own_version

        def handed() -> None:
            with self.wake:
                if taken > t.own_handed:
                    t.own_handed = taken
                    self.wake.notify_all()

        if not plan:
            handed()
        failed = False
        tracing = trace.isEnabledFor(logging.DEBUG)
        for line, updates in plan:
            if tracing:
                trace.debug("cmd-sent %s peers=%d", updates[0][1], len(updates))
            ok, _ = conn.call(line, on_sent=handed)
            if tracing:
                trace.debug("cmd-ack %s ok=%s", updates[0][1], ok)
            failed |= not ok
            if ok:
                with self.wake:
                    t.record_sent(updates)
        with self.wake:
            eors = t.take_eors()
            refresh = t.take_refreshes()
        for address in eors:
            conn.call(commands.eor(address))
        for address in refresh:
            conn.call(commands.route_refresh(address))
        with self.wake:
            changed, next_deadline = t.expire_stale(time.monotonic())
            if changed:
                self.dirty = True  # reflect what changed
            more = bool(plan or t.reload_pending or t.eor_pending or t.refresh_pending)
        if changed:
            self.host.changed()
        if failed:
            return RETRY_DELAY  # ExaBGP refused a command: retry the difference, without hammering it
        if more:
            return 0.0
        if next_deadline is not None:
            return max(0.01, min(IDLE, next_deadline - time.monotonic()))
        return IDLE

    def reload(self, conn: BridgeLink, resync: bool = False) -> None:
        """Have ExaBGP re-read its configuration, then wait until its sessions match it (the reload runs
        asynchronously after the ack); after a bridge restart, also take the sessions' states from it."""
        t = self.table
        with self.wake:
            t.reload_generation = t.config_generation
        conn.call(commands.RELOAD)
        deadline = time.monotonic() + RELOAD_TIMEOUT
        while time.monotonic() < deadline:
            ok, text = conn.call(commands.SHOW_NEIGHBORS)
            snapshot_seq = conn.last_ack_seq
            seen = parse_neighbors(text) if ok else None
            with self.wake:
                if seen is not None and set(seen) == set(t.peers):
                    if resync:
                        t.apply_snapshot(seen, snapshot_seq)
                    return
            time.sleep(0.02)
        log.warning("ExaBGP for %s did not load its new configuration in %ss", t.identity.node, RELOAD_TIMEOUT)
