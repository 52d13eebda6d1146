"""The BGP speaker of one node: ExaBGP as a supervised child, steered through the bridge (``bgp.bridge``).

The owner (the agent's runner) calls ``set_peers`` and ``announce`` with complete desired sets; the speaker works
out what to tell ExaBGP. It reads learned routes into a RIB and peer state into ``peer_status``; ``on_change``
callbacks fire (on a speaker thread) when either changes. See docs/bgp.md for the contract.

Threads: one supervises ExaBGP (restart with backoff), one accepts the bridge's connection and reads its events,
one (the worker) sends commands and runs the graceful-restart timers. State is guarded by one lock; callbacks run
without it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from bgp import aspath, commands, events, exabgp_conf
from bgp.commands import OutRoute
from bgp.link import BridgeLink, BridgeLost
from bgp.outbound import AS_LOOP, POLICY, outbound, refusal
from bgp.plan import PeerSpec, SpeakerIdentity
from bgp.rib import LearnedRoute, Rib
from bgp.session import ESTABLISHED, PeerState, Session, md5_failures
from bgp.sync import diff, parse_neighbors, session_fields

log = logging.getLogger(__name__)
# Per-hop timestamps for latency analysis (bench/routes_convergence.py --trace); off unless the owner enables it.
trace = logging.getLogger("podnet.trace.bgp")

RELOAD_TIMEOUT = 10.0
RETRY_DELAY = 0.5
BRIDGE_TIMEOUT = 15.0  # default: ExaBGP running without a bridge connected for this long is restarted
REFRESH_GRACE = 5.0  # after a bridge restart: how long peers get to re-send their routes on route refresh
_HOLD_EXPIRED = re.compile(r"hold.?tim|\(4,\s*0\)|code 4\b", re.IGNORECASE)


def _default_exabgp() -> str:
    return str(Path(sys.executable).with_name("exabgp"))


@dataclass(frozen=True)
class SpeakerConfig:
    identity: SpeakerIdentity
    exabgp: str = field(default_factory=_default_exabgp)
    python: str = sys.executable
    port: int = 179
    backoff_initial: float = 0.5
    backoff_max: float = 10.0
    log_level: str = "INFO"
    # ExaBGP's reactor sleeps up to speed/100 s when nothing is readable (its sockets and our API pipe wake it at
    # once). 1.0 (its default, 10 ms) costs ~1.3 % of a CPU per idle speaker; 5.0 (50 ms) ~0.5 % and helped where
    # 30 speakers share 2 CPUs, but a reflector's fan-out took longer (17-19 -> 29-31 ms); 0.1 was worse.
    # See bench/results/bgp.md and routes.md.
    reactor_speed: float = 1.0
    # ExaBGP running this long without its API bridge connected is restarted (it gives up respawning a helper
    # that keeps dying). Read from the module at construction, so the default can be changed in one place.
    bridge_timeout: float = field(default_factory=lambda: BRIDGE_TIMEOUT)

    def __post_init__(self) -> None:
        if not self.bridge_timeout > 0:
            raise ValueError(f"bridge_timeout must be positive, not {self.bridge_timeout!r}")


class Speaker:
    def __init__(self, config: SpeakerConfig, workdir: Path, netns: str | None = None) -> None:
        self.config = config
        self.identity = config.identity
        self.workdir = Path(workdir)
        self.netns = netns
        self.conf_path = self.workdir / "exabgp.conf"
        self.sock_path = self.workdir / "bridge.sock"
        self.log_path = self.workdir / "exabgp.log"

        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._dirty = True  # the worker has something to look at
        self._stop_event = threading.Event()
        self._callbacks: list[Callable[[], None]] = []
        self._running = False
        self._threads: list[threading.Thread] = []

        self._peers: dict[str, PeerSpec] = {}
        self._invalid: list[PeerSpec] = []
        self._own: frozenset[str] = frozenset()
        self._rib = Rib()
        self._router_ids: dict[str, str] = {}
        self._peer_gr: dict[str, int | None] = {}
        self._sessions: dict[str, Session] = {}
        self._sent: dict[str, dict[str, OutRoute]] = {}
        self._unsure: dict[str, set[str]] = {}  # prefixes ExaBGP may hold for a peer (after a bridge restart)
        self._eor_pending: set[str] = set()
        self._refresh_pending: set[str] = set()
        self._config_text = ""
        self._reload_pending = False
        self._resync_pending = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._generation = 0  # ExaBGP processes started so far
        self._exabgp_alive = False  # the process of the current generation has not exited
        self._config_generation = 0  # bumped by each configuration file change
        self._reload_generation = 0  # the configuration the reload in flight makes ExaBGP read (at least)
        self._line_seq = itertools.count(1)  # positions of the lines read from bridges, in arrival order
        self._rejected: dict[str, dict[str, int]] = {}  # reason -> peer -> routes refused on receipt
        self._bridge_generation = -1  # the ExaBGP generation the last bridge connection belonged to
        self._conn: BridgeLink | None = None
        self._server: socket.socket | None = None
        self._restarts = 0
        self._no_bridge_since: float | None = None
        self._last_best: dict[str, LearnedRoute] = {}
        self._own_version = 0  # bumped by each change of our own prefixes
        self._own_handed = 0  # the latest version the worker has started sending to ExaBGP

    # ---- the owner's API -------------------------------------------------------------------------------------

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (on a speaker thread) after learned routes or peer states change."""
        self._callbacks.append(callback)

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.sock_path.unlink()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(self.sock_path))
        os.chmod(self.sock_path, 0o600)
        server.listen(4)
        self._server = server
        self._running = True
        with self._lock:
            self._write_config()
        for target, name in ((self._supervise, "supervise"), (self._accept, "bridge"), (self._work, "worker")):
            t = threading.Thread(target=target, name=f"bgp-{self.identity.node}-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, withdraw: bool = True) -> None:
        """Stop ExaBGP and the bridge. ``withdraw=False`` kills ExaBGP without a BGP NOTIFICATION, as a crash
        would: peers with graceful restart keep our routes until we come back (use it for a planned restart)."""
        with self._lock:
            self._running = False
            self._stop_event.set()
            self._kick()
            proc, conn = self._proc, self._conn
        if proc is not None and proc.poll() is None:
            self._kill(proc, signal.SIGTERM if withdraw else signal.SIGKILL)
        if conn is not None:
            pid = conn.bridge_pid
            conn.close()
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.shutdown(socket.SHUT_RDWR)
            self._server.close()
        for t in self._threads:
            t.join(timeout=10)
        self._threads.clear()
        with contextlib.suppress(FileNotFoundError):
            self.sock_path.unlink()

    def set_peers(self, peers: Iterable[PeerSpec]) -> None:
        """The complete set of sessions. Unchanged sessions stay up; removed peers' routes leave the RIB.
        Raises ValueError (and changes nothing) if a usable peer's address is not an IPv4 address."""
        changed = False
        recreated: list[str] = []
        peers = list(peers)
        for spec in peers:
            if spec.ok:
                commands.check_address(spec.address)  # ValueError before anything changes
        with self._lock:
            new = {p.address: p for p in peers if p.ok}
            invalid = [p for p in peers if not p.ok]
            if new == self._peers and invalid == self._invalid:
                return  # the common case: nothing to render, compare or log
            for p in invalid:
                if p not in self._invalid:
                    log.warning(
                        "BGP peer %s (%s) of %s not configured: %s", p.address, p.name, self.identity.node, p.error
                    )
            self._invalid = invalid
            for address in set(self._peers) - set(new):
                self._rib.drop_peer(address)
                for table in (self._sessions, self._sent, self._unsure, self._router_ids, self._peer_gr):
                    table.pop(address, None)
                self._eor_pending.discard(address)
                changed = True
            for address, spec in new.items():
                old = self._peers.get(address)
                if old == spec:
                    continue
                if old is not None and session_fields(old) == session_fields(spec):
                    # Only our import policy changed: the session stays; drop or re-ask for the peer's routes.
                    if not spec.accept_routes:
                        self._rib.drop_peer(address)
                        changed = True
                    elif self._sessions.get(address, Session()).state == ESTABLISHED:
                        self._refresh_pending.add(address)
                    continue
                self._sessions[address] = Session(md5_baseline=self._md5_failures())
                recreated.append(address)
                if old is not None:
                    # ExaBGP re-creates a changed neighbor, and its Adj-RIB-Out may go with it: send it all again
                    # (after the reload, which ExaBGP runs before it reads our next command).
                    self._unsure.setdefault(address, set()).update(self._sent.pop(address, {}))
            self._peers = new
            if changed:
                self._best_changed()
            if self._write_config():
                self._reload_pending = True
                # Only once ExaBGP has read its file (its bridge has said hello): before that it may read this one.
                if self._exabgp_alive and self._bridge_generation == self._generation:
                    for address in recreated:
                        self._sessions[address].awaiting_reload = self._config_generation
            self._kick()
        if changed:
            self._changed()

    def announce(self, prefixes: Iterable[str], handoff: float = 0.0) -> None:
        """The complete set of this node's own prefixes; the speaker announces and withdraws the difference.
        Raises ValueError (and changes nothing) if one is not an IPv4 network in canonical form.

        ``handoff`` > 0: when the set changed and ExaBGP is connected, wait (at most that many seconds) until the
        worker has sent the first command for it. A caller with more work to do in the same process (the
        runner's kernel writes) would otherwise hold the interpreter lock and delay the announcement."""
        own = frozenset(prefixes)
        for prefix in own:
            commands.check_prefix(prefix)
        with self._lock:
            changed = own != self._own
            if changed and trace.isEnabledFor(logging.DEBUG):
                trace.debug("announce-set %s", " ".join(sorted(own ^ self._own)))
            self._own = own
            if changed:
                self._own_version += 1
            self._kick()
            if changed and handoff > 0 and self._conn is not None:
                version = self._own_version
                self._wake.wait_for(lambda: self._own_handed >= version or not self._running, timeout=handoff)

    def best_routes(self) -> dict[str, LearnedRoute]:
        """One best path per prefix learned from peers (stale ones flagged), without this node's own prefixes."""
        with self._lock:
            return {p: r for p, r in self._rib.best().items() if p not in self._own}

    def peer_status(self) -> list[PeerState]:
        with self._lock:
            md5 = self._md5_failures()
            out: list[PeerState] = []
            for address, spec in sorted(self._peers.items()):
                s = self._sessions.setdefault(address, Session())
                info = s.info
                # The kernel counts per namespace, not per peer: blame only sessions that are down and whose
                # configuration matches the kind of failure.
                keyed = spec.password is not None
                dropped = md5[0] - s.md5_baseline[0] if keyed else md5[1] - s.md5_baseline[1]
                if s.state != ESTABLISHED and dropped > 0:
                    what = "with a bad or missing signature" if keyed else "signed, but no password is configured"
                    info = f"TCP-MD5 authentication failing: {dropped} segment(s) {what}" + (
                        f"; {info}" if info else ""
                    )
                out.append(
                    PeerState(
                        address=address,
                        kind=spec.kind,
                        name=spec.name,
                        state=s.state,
                        since=s.since,
                        info=info,
                        as_number=spec.as_number,
                        prefixes_received=self._rib.count(address),
                        prefixes_sent=len(self._sent.get(address, {})),
                    )
                )
            for spec in self._invalid:
                out.append(
                    PeerState(spec.address, spec.kind, spec.name, "Invalid", "", spec.error or "", spec.as_number)
                )
            return out

    def rejected_routes(self) -> dict[str, dict[str, int]]:
        """Routes refused on receipt since start, by reason and peer: ``as-loop`` (our AS on the AS_PATH),
        ``as-zero`` (AS 0 on it), ``reflection-loop`` (our router or cluster ID on it), ``own-next-hop``. Routes of
        a peer whose routes we do not accept are not counted."""
        with self._lock:
            return {why: dict(by_peer) for why, by_peer in self._rejected.items()}

    @property
    def rejected_as_loop(self) -> int:
        """Routes refused because our own AS is on their AS_PATH (RFC 4271 section 9.1.2), all peers."""
        with self._lock:
            return sum(self._rejected.get(AS_LOOP, {}).values())

    def sent_routes(self) -> dict[str, dict[str, OutRoute]]:
        """What ExaBGP has been told to announce, per peer (for status and tests)."""
        with self._lock:
            return {a: dict(r) for a, r in self._sent.items()}

    @property
    def exabgp_pid(self) -> int | None:
        with self._lock:
            return None if self._proc is None or self._proc.poll() is not None else self._proc.pid

    @property
    def bridge_pid(self) -> int | None:
        with self._lock:
            return None if self._conn is None else self._conn.bridge_pid

    @property
    def restarts(self) -> int:
        return self._restarts

    # ---- ExaBGP supervision ----------------------------------------------------------------------------------

    def _write_config(self) -> bool:
        bridge = exabgp_conf.bridge_command(self.config.python, self.sock_path)
        text = exabgp_conf.render(self.identity, self._peers.values(), bridge)
        if text == self._config_text:
            return False
        tmp = self.conf_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it may hold MD5 passwords
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, self.conf_path)
        self._config_text = text
        self._config_generation += 1
        return True

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "exabgp_daemon_user": "root",  # else it drops to nobody and cannot run the venv's bridge
                "exabgp_daemon_drop": "false",
                "exabgp_daemon_daemonize": "false",
                "exabgp_tcp_bind": self.identity.local_address,  # it only listens when bind is set
                "exabgp_tcp_port": str(self.config.port),
                "exabgp_api_ack": "true",
                "exabgp_api_respawn": "true",
                "exabgp_api_cli": "false",
                "exabgp_api_encoder": "json",
                "exabgp_log_destination": "stdout",
                "exabgp_log_level": self.config.log_level,
                "exabgp_reactor_speed": str(self.config.reactor_speed),
            }
        )
        return env

    def _spawn(self) -> subprocess.Popen[bytes]:
        cmd = [self.config.exabgp, "server", str(self.conf_path)]
        if self.netns is not None:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        with open(self.log_path, "ab") as logfile:
            return subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                env=self._env(),
                start_new_session=True,
            )

    def _kill(self, proc: subprocess.Popen[bytes], sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def _supervise(self) -> None:
        backoff = self.config.backoff_initial
        while True:
            with self._lock:
                if not self._running:
                    return
                self._write_config()
                self._reload_pending = False  # a fresh process reads the current file
                try:
                    proc = self._spawn()
                except OSError as exc:
                    log.error("cannot start ExaBGP for %s: %s; retrying in %.1fs", self.identity.node, exc, backoff)
                    for s in self._sessions.values():
                        s.set("Idle", f"cannot start ExaBGP: {exc}")
                    proc = None
                if proc is not None:
                    self._proc = proc
                    self._generation += 1
                    self._exabgp_alive = True
                    for s in self._sessions.values():
                        s.awaiting_reload = None  # a new process reads the current file
            if proc is None:
                if self._stop_event.wait(backoff):
                    return
                backoff = min(backoff * 2, self.config.backoff_max)
                continue
            started = time.monotonic()
            code = proc.wait()
            with self._lock:
                if not self._running:
                    return
                self._restarts += 1
                log.warning("ExaBGP for %s exited with %s; restarting in %.1fs", self.identity.node, code, backoff)
                self._exabgp_lost(f"speaker restarting (ExaBGP exited with code {code})")
            self._changed()
            if time.monotonic() - started > 30:
                backoff = self.config.backoff_initial
            if self._stop_event.wait(backoff):
                return
            backoff = min(backoff * 2, self.config.backoff_max)

    def _exabgp_lost(self, why: str) -> None:
        """ExaBGP died: it forgot everything we told it; we keep learned routes for the graceful-restart time."""
        self._exabgp_alive = False  # what its bridge still relays is history
        self._sent.clear()
        self._unsure.clear()
        self._eor_pending.clear()
        now = time.monotonic()
        for address, spec in self._peers.items():
            s = self._sessions.setdefault(address, Session())
            s.set("Idle", why)
            self._hold_or_drop(address, spec.graceful_restart_time, now)

    def _hold_or_drop(self, address: str, restart_time: int | None, now: float) -> None:
        if restart_time and self._sessions[address].stale_until is not None:
            return  # already waiting for this peer: more failed attempts do not extend its restart time
        if restart_time and self._rib.count(address):
            self._rib.mark_stale(address)
            self._sessions[address].stale_until = now + restart_time
        else:
            self._rib.drop_peer(address)
            self._sessions[address].stale_until = None
        # Keep the last-reported best paths in step with the RIB, so identical routes learned again later are
        # reported as a change.
        self._best_changed()

    # ---- the bridge ------------------------------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._server is not None
        while self._running:
            try:
                sock, _ = self._server.accept()
            except OSError:
                return
            conn = BridgeLink(sock)
            with self._lock:
                old, self._conn = self._conn, conn
            if old is not None:
                old.close()
            threading.Thread(
                target=self._read, args=(conn,), name=f"bgp-{self.identity.node}-reader", daemon=True
            ).start()

    def _read(self, conn: BridgeLink) -> None:
        buf = b""
        try:
            while True:
                try:
                    chunk = conn.sock.recv(262144)
                except OSError:
                    break
                if not chunk:
                    break
                buf += chunk
                lines = buf.split(b"\n")
                buf = lines.pop()
                notify = False
                for raw in lines:
                    notify |= self._line(conn, raw.decode(errors="replace"))
                if notify:
                    self._changed()
        finally:
            conn.acks.put(None)
            with self._lock:
                if self._conn is conn:
                    self._conn = None
                    self._kick()

    def _line(self, conn: BridgeLink, line: str) -> bool:
        kind, _, rest = line.partition(" ")
        seq = next(self._line_seq)
        if kind == "ack":
            ok = rest.startswith("done")
            if conn.in_flight == commands.RELOAD:
                # Before the worker can send anything else: ExaBGP re-reads its file after this ack and before it
                # reads our next command, so the sessions it reports from now on are the reloaded ones.
                with self._lock:
                    for s in self._sessions.values():
                        if s.awaiting_reload is not None and s.awaiting_reload <= self._reload_generation:
                            s.awaiting_reload = None
            conn.acks.put((ok, rest, conn.text, seq))
            conn.text = []
            return False
        if kind == "text":
            conn.text.append(rest)
            return False
        if kind == "hello":
            with self._lock:
                conn.bridge_pid = int(rest) if rest.isdigit() else None
                conn.generation = self._generation
                self._bridge_connected()
                self._kick()
            return True
        if kind == "event":
            log.debug("%s: event %s", self.identity.node, rest)
            event = events.parse(rest)
            if isinstance(event, events.UpdateEvent) and trace.isEnabledFor(logging.DEBUG):
                changed = [r.prefix for r in event.announced] + list(event.withdrawn)
                trace.debug("update-recv %s from=%s", " ".join(changed[:5]), event.peer)
            if event is not None:
                with self._lock:
                    if conn.generation != self._generation or not self._exabgp_alive:
                        return False  # relayed from an ExaBGP that has exited: its sessions are gone
                    return self._event(event, seq)
        return False

    def _bridge_connected(self) -> None:
        if self._bridge_generation == self._generation:
            # Only the bridge restarted: events may have been lost with it. Re-send everything, ask established
            # peers to re-send theirs, and drop what they do not confirm within the grace period.
            log.warning("bridge for %s reconnected; resynchronising", self.identity.node)
            now = time.monotonic()
            for address, routes in self._sent.items():
                self._unsure.setdefault(address, set()).update(routes)
            self._sent.clear()
            for address, s in self._sessions.items():
                if s.state == ESTABLISHED:
                    self._refresh_pending.add(address)
                    if self._rib.count(address):
                        self._rib.mark_stale(address)
                        s.stale_until = now + REFRESH_GRACE
            self._resync_pending = True  # and learn the sessions' states again (show neighbor)
        self._bridge_generation = self._generation

    def _event(self, event: events.Event, seq: int | None = None) -> bool:
        """Apply one event (hold the lock); ``seq`` is its position in the bridge stream."""
        spec = self._peers.get(event.peer)
        if spec is None:
            return False
        s = self._sessions.setdefault(event.peer, Session())
        now = time.monotonic()
        if isinstance(event, events.StateEvent):
            s.event_seq = next(self._line_seq) if seq is None else seq
            if event.state in ("up", "connected") and s.awaiting_reload is not None:
                # the session of the configuration we replaced (ExaBGP has not reloaded yet): not this one
                log.debug("%s: ignoring %r of %s from before the reload", self.identity.node, event.state, event.peer)
                return False
            if event.state == "up":
                s.set(ESTABLISHED)
                self._eor_pending.add(event.peer)
            elif event.state == "connected":
                s.set("OpenSent")
            elif event.state == "down":
                s.set("Active" if not spec.passive else "Idle", event.reason or s.info)
                if self._rib.count(event.peer):
                    # A peer that stopped answering (hold timer expired) is gone, not restarting: graceful
                    # restart only covers a session that closed (RFC 4724 section 4.2).
                    silent = _HOLD_EXPIRED.search(f"{event.reason} {s.info}") is not None
                    self._hold_or_drop(event.peer, None if silent else self._peer_gr.get(event.peer), now)
            self._kick()
            return True
        if isinstance(event, events.OpenEvent):
            self._router_ids[event.peer] = event.router_id
            self._peer_gr[event.peer] = event.graceful_restart_time
            return False
        if isinstance(event, events.NotificationEvent):
            who = "peer sent" if event.direction == "receive" else "we sent"
            s.info = f"{who} NOTIFICATION: {event.message}"
            return True
        touched: list[str] | None = None  # None: recompute every prefix
        if event.eor:
            self._rib.sweep_stale(event.peer)
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
            self._rib.update(event.peer, ok, [*event.withdrawn, *refused])
            touched = [*event.withdrawn, *(r.prefix for r in event.announced)]
        if self.identity.cluster_id is not None:
            self._kick()  # reflect
        return self._best_changed(touched)

    def _count_rejected(self, why: str, peer: str, route: LearnedRoute) -> None:
        by_peer = self._rejected.setdefault(why, {})
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

    def _kick(self) -> None:
        """Wake the worker (hold the lock)."""
        self._dirty = True
        self._wake.notify_all()

    def _md5_failures(self) -> tuple[int, int]:
        proc = self._proc
        return md5_failures(None if proc is None or proc.poll() is not None else proc.pid)

    def _best_changed(self, prefixes: Iterable[str] | None = None) -> bool:
        """Whether the best paths changed (only ``prefixes`` looked at, when given: updates touch few)."""
        if prefixes is None:
            best = self._rib.best()
            if best == self._last_best:
                return False
            self._last_best = best
            return True
        changed = False
        for prefix, route in self._rib.best_for(prefixes).items():
            if self._last_best.get(prefix) != route:
                changed = True
                if route is None:
                    del self._last_best[prefix]
                else:
                    self._last_best[prefix] = route
        return changed

    def _changed(self) -> None:
        for cb in list(self._callbacks):
            try:
                cb()
            except Exception:
                log.exception("BGP on_change callback failed")

    # ---- the worker: commands and timers ---------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._running:
                    return
                conn = self._conn
                if conn is None or conn.bridge_pid is None or self._bridge_generation != self._generation:
                    self._bridge_watchdog()
                    self._wake.wait(timeout=0.5)
                    continue
                self._no_bridge_since = None
                self._dirty = False
            try:
                idle = self._step(conn)
            except BridgeLost:
                with self._lock:
                    if self._conn is conn:
                        self._conn = None
                continue
            except Exception:
                log.exception("BGP speaker worker step failed")
                idle = 1.0
            with self._lock:
                if self._running and idle > 0 and not self._dirty:
                    self._wake.wait(timeout=idle)

    def _bridge_watchdog(self) -> None:
        """ExaBGP stops respawning a helper that keeps dying; without a bridge it is deaf to us, so restart it
        (SIGKILL: no NOTIFICATION, peers keep our routes over the restart)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            self._no_bridge_since = None
            return
        now = time.monotonic()
        if self._no_bridge_since is None:
            self._no_bridge_since = now
        elif now - self._no_bridge_since > self.config.bridge_timeout:
            log.warning(
                "no bridge from ExaBGP for %s in %ss; restarting ExaBGP", self.identity.node, self.config.bridge_timeout
            )
            self._no_bridge_since = None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    def _step(self, conn: BridgeLink) -> float:
        """One round: reload if the peers changed, sync announcements, send End-of-RIBs and refreshes, expire
        stale routes. Returns how long to sleep (0: there may be more to do)."""
        with self._lock:
            reload, resync = self._reload_pending, self._resync_pending
            self._reload_pending = self._resync_pending = False
        if reload or resync:
            self._reload(conn, resync)
        with self._lock:
            desired = outbound(self.identity, self._peers.values(), self._own, self._rib, self._router_ids)
            plan = diff(desired, self._sent, self._unsure)
            taken = self._own_version

        def handed() -> None:
            with self._lock:
                if taken > self._own_handed:
                    self._own_handed = taken
                    self._wake.notify_all()

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
            with self._lock:
                for address, prefix, route in updates:
                    if address not in self._peers:
                        continue
                    if ok:
                        self._unsure.get(address, set()).discard(prefix)
                        table = self._sent.setdefault(address, {})
                        if route is None:
                            table.pop(prefix, None)
                        else:
                            table[prefix] = route
        with self._lock:
            eors = sorted(a for a in self._eor_pending if self._sessions.get(a, Session()).state == ESTABLISHED)
            self._eor_pending.clear()
            refresh = sorted(self._refresh_pending)
            self._refresh_pending.clear()
        for address in eors:
            conn.call(commands.eor(address))
        for address in refresh:
            conn.call(commands.route_refresh(address))
        changed = False
        next_deadline: float | None = None
        with self._lock:
            now = time.monotonic()
            for address, s in self._sessions.items():
                if s.stale_until is None:
                    continue
                if now >= s.stale_until:
                    self._rib.sweep_stale(address)
                    s.stale_until = None
                    changed = True
                else:
                    next_deadline = min(next_deadline or s.stale_until, s.stale_until)
            if changed:
                changed = self._best_changed()
                self._dirty = True  # reflect what changed
            more = bool(plan or self._reload_pending or self._eor_pending or self._refresh_pending)
        if changed:
            self._changed()
        if failed:
            return RETRY_DELAY  # ExaBGP refused a command: retry the difference, without hammering it
        if more:
            return 0.0
        if next_deadline is not None:
            return max(0.01, min(1.0, next_deadline - time.monotonic()))
        return 1.0

    def _reload(self, conn: BridgeLink, resync: bool = False) -> None:
        """Have ExaBGP re-read its configuration, then wait until its sessions match it (the reload runs
        asynchronously after the ack); after a bridge restart, also take the sessions' states from it."""
        with self._lock:
            self._reload_generation = self._config_generation
        conn.call(commands.RELOAD)
        deadline = time.monotonic() + RELOAD_TIMEOUT
        while time.monotonic() < deadline:
            ok, text = conn.call(commands.SHOW_NEIGHBORS)
            snapshot_seq = conn.last_ack_seq
            seen = parse_neighbors(text) if ok else None
            with self._lock:
                wanted = set(self._peers)
                if seen is not None and set(seen) == wanted:
                    if resync:
                        self._apply_snapshot(seen, snapshot_seq)
                    return
            time.sleep(0.02)
        log.warning("ExaBGP for %s did not load its new configuration in %ss", self.identity.node, RELOAD_TIMEOUT)

    def _apply_snapshot(self, seen: dict[str, bool], snapshot_seq: int) -> None:
        """Session states from ``show neighbor`` after a bridge restart (state events may have been lost with the
        old bridge). Events are the truth: a session whose last state event came after the snapshot was written
        keeps it, and one not yet reloaded by ExaBGP is not the session the snapshot shows. Otherwise a snapshot
        written before ExaBGP tore a session down could mark it up after the "down" event was applied."""
        for address, up in seen.items():
            s = self._sessions.setdefault(address, Session())
            if s.event_seq > snapshot_seq or s.awaiting_reload is not None:
                continue
            if up and s.state != ESTABLISHED:
                s.set(ESTABLISHED)
            elif not up and s.state == ESTABLISHED:
                s.set("Active")
