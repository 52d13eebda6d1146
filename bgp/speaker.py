"""The BGP speaker of one node: ExaBGP as a supervised child, steered through the bridge (``bgp.bridge``).

The owner (the agent's runner) calls ``set_peers`` and ``announce`` with complete desired sets; the speaker works
out what to tell ExaBGP. It reads learned routes into a RIB and peer state into ``peer_status``; ``on_change``
callbacks fire (on a speaker thread) when either changes. See docs/bgp.md for the contract.

This module is the owner's API and the composition; the jobs are elsewhere:
``bgp.exabgp_process`` (the child: start, kill, pidfile, restart with backoff: the "supervise" thread),
``bgp.bridge_session`` (the bridge socket: the "bridge" thread and a reader per connection, the watchdog),
``bgp.session_table`` (peers, sessions, RIB, graceful-restart timers, what was sent) and ``bgp.reconciler`` (the
"worker" thread: commands to ExaBGP and timers). They share one lock, the speaker's; callbacks run without it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from bgp import commands, events, exabgp_conf
from bgp.bridge_session import BridgeHooks, BridgeServer, BridgeWatchdog
from bgp.commands import OutRoute
from bgp.exabgp_process import ExabgpProcess, Supervisor
from bgp.link import BridgeLink
from bgp.outbound import AS_LOOP
from bgp.plan import PeerSpec, SpeakerIdentity
from bgp.reconciler import Worker, WorkerHooks
from bgp.rib import LearnedRoute
from bgp.session import PeerState, md5_failures
from bgp.session_table import SessionTable

__all__ = ["BRIDGE_TIMEOUT", "PeerState", "Speaker", "SpeakerConfig", "SpeakerHealth"]

log = logging.getLogger(__name__)
# Per-hop timestamps for latency analysis (bench/routes_convergence.py --trace); off unless the owner enables it.
trace = logging.getLogger("podnet.trace.bgp")

BRIDGE_TIMEOUT = 15.0  # default: ExaBGP running without a bridge connected for this long is restarted


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


@dataclass(frozen=True)
class SpeakerHealth:
    """For liveness and readiness probes."""

    exabgp_running: bool
    bridge_connected: bool  # the bridge of the running ExaBGP said hello: the speaker can steer it
    last_progress: float  # time.monotonic() of the older of the supervision and worker loops' last rounds
    established: int  # configured (usable) peers whose session is Established
    configured: int  # usable peers (those listed Invalid are not counted: they never get a session)


class Speaker:
    def __init__(self, config: SpeakerConfig, workdir: Path, netns: str | None = None) -> None:
        self.config = config
        self.identity = config.identity
        self.workdir = Path(workdir)
        self.netns = netns
        self._exabgp = ExabgpProcess(config, self.workdir, netns)
        self.conf_path = self._exabgp.conf_path
        self.log_path = self._exabgp.log_path
        self.sock_path = self.workdir / "bridge.sock"

        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._stop_event = threading.Event()
        self._callbacks: list[Callable[[], None]] = []
        self._running = False
        self._threads: list[threading.Thread] = []
        self._table = SessionTable(self.identity, kick=self._kick)
        self._worker = Worker(
            self._table,
            self._wake,
            WorkerHooks(lambda: self._running, self._ready_or_watch, self._link_lost, self._worker_beat, self._changed),
        )
        self._bridge = BridgeServer(
            self.sock_path,
            self.identity.node,
            BridgeHooks(
                connected=self._bridge_connected,
                gone=self._bridge_gone,
                hello=self._bridge_hello,
                event=self._bridge_event,
                reload_acked=self._reload_acked,
                next_seq=lambda: next(self._table.line_seq),
                changed=self._changed,
            ),
        )
        self._watchdog = BridgeWatchdog(self.identity.node, config.bridge_timeout)
        self._supervisor = Supervisor(config, self._stop_event, self._supervisor_beat)

        self._proc: subprocess.Popen[bytes] | None = None
        self._generation = 0  # ExaBGP processes started so far
        self._exabgp_alive = False  # the process of the current generation has not exited
        self._bridge_generation = -1  # the ExaBGP generation the last bridge connection belonged to
        self._conn: BridgeLink | None = None
        self._restarts = 0
        self._beats = {"supervise": time.monotonic(), "worker": time.monotonic()}

    # ---- the owner's API -------------------------------------------------------------------------------------

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (on a speaker thread) after learned routes or peer states change."""
        self._callbacks.append(callback)

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._exabgp.replace_stale()  # an ExaBGP a killed owner left would hold port 179 and our routes
        self._bridge.listen()
        self._running = True
        with self._lock:
            self._write_config()
            now = time.monotonic()
            self._beats = {"supervise": now, "worker": now}
        for target, name in (
            (self._supervise, "supervise"),
            (self._bridge.accept_loop, "bridge"),
            (self._worker.run, "worker"),
        ):
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
            self._exabgp.kill(proc, signal.SIGTERM if withdraw else signal.SIGKILL)
        if conn is not None:
            pid = conn.bridge_pid
            conn.close()
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._bridge.close()
        for t in self._threads:
            t.join(timeout=10)
        self._threads.clear()
        if proc is not None:
            self._exabgp.forget()
        self._bridge.remove()

    def set_peers(self, peers: Iterable[PeerSpec]) -> None:
        """The complete set of sessions. Unchanged sessions stay up; removed peers' routes leave the RIB.
        Raises ValueError (and changes nothing) if a usable peer's address is not an IPv4 address."""
        peers = list(peers)
        for spec in peers:
            if spec.ok:
                commands.check_address(spec.address)  # ValueError before anything changes
        with self._lock:
            todo, changed, recreated = self._table.set_peers(peers, self._md5_failures())
            if not todo:
                return
            if self._write_config():
                self._table.reload_pending = True
                # Only once ExaBGP has read its file (its bridge has said hello): before that it may read this one.
                if self._exabgp_alive and self._bridge_generation == self._generation:
                    for address in recreated:
                        self._table.sessions[address].awaiting_reload = self._table.config_generation
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
            t = self._table
            if own != t.own and trace.isEnabledFor(logging.DEBUG):
                trace.debug("announce-set %s", " ".join(sorted(own ^ t.own)))
            changed = t.set_own(own)
            self._kick()
            if changed and handoff > 0 and self._conn is not None:
                version = t.own_version
                self._wake.wait_for(lambda: t.own_handed >= version or not self._running, timeout=handoff)

    def best_routes(self) -> dict[str, LearnedRoute]:
        """One best path per prefix learned from peers (stale ones flagged), without this node's own prefixes."""
        with self._lock:
            return {p: r for p, r in self._table.rib.best().items() if p not in self._table.own}

    def peer_status(self) -> list[PeerState]:
        with self._lock:
            return self._table.peer_states(self._md5_failures())

    def rejected_routes(self) -> dict[str, dict[str, int]]:
        """Routes refused on receipt since start, by reason and peer: ``as-loop`` (our AS on the AS_PATH),
        ``as-zero`` (AS 0 on it), ``reflection-loop`` (our router or cluster ID on it), ``own-next-hop``. Routes of
        a peer whose routes we do not accept are not counted."""
        with self._lock:
            return {why: dict(by_peer) for why, by_peer in self._table.rejected.items()}

    @property
    def rejected_as_loop(self) -> int:
        """Routes refused because our own AS is on their AS_PATH (RFC 4271 section 9.1.2), all peers."""
        with self._lock:
            return sum(self._table.rejected.get(AS_LOOP, {}).values())

    def sent_routes(self) -> dict[str, dict[str, OutRoute]]:
        """What ExaBGP has been told to announce, per peer (for status and tests)."""
        with self._lock:
            return {a: dict(r) for a, r in self._table.sent.items()}

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

    def health_info(self) -> SpeakerHealth:
        with self._lock:
            return SpeakerHealth(
                exabgp_running=self.exabgp_pid is not None,
                bridge_connected=self._ready_link() is not None,
                last_progress=min(self._beats.values()),
                established=self._table.established(),
                configured=len(self._table.peers),
            )

    # ---- ExaBGP supervision (bgp.exabgp_process runs the loop) -----------------------------------------------

    def _write_config(self) -> bool:
        bridge = exabgp_conf.bridge_command(self.config.python, self.sock_path)
        if not self._exabgp.write_config(exabgp_conf.render(self.identity, self._table.peers.values(), bridge)):
            return False
        self._table.config_generation += 1
        return True

    def _supervise(self) -> None:
        self._supervisor.run(self._launch, self._exited)

    def _supervisor_beat(self) -> None:
        self._beats["supervise"] = time.monotonic()

    def _launch(self) -> subprocess.Popen[bytes] | None:
        with self._lock:
            if not self._running:
                return None
            self._write_config()
            self._table.exabgp_started()
            try:
                proc = self._exabgp.spawn()
            except OSError as exc:
                backoff = self._supervisor.backoff
                log.error("cannot start ExaBGP for %s: %s; retrying in %.1fs", self.identity.node, exc, backoff)
                self._table.exabgp_failed(f"cannot start ExaBGP: {exc}")
                return None
            self._proc = proc
            self._generation += 1
            self._exabgp_alive = True
            return proc

    def _exited(self, code: int, backoff: float) -> bool:
        with self._lock:
            if not self._running:
                return False
            self._restarts += 1
            log.warning("ExaBGP for %s exited with %s; restarting in %.1fs", self.identity.node, code, backoff)
            self._exabgp_alive = False  # what its bridge still relays is history
            self._table.exabgp_lost(f"speaker restarting (ExaBGP exited with code {code})")
        self._changed()
        return True

    def _md5_failures(self) -> tuple[int, int]:
        proc = self._proc
        return md5_failures(None if proc is None or proc.poll() is not None else proc.pid)

    # ---- the bridge (bgp.bridge_session reads it and calls these) --------------------------------------------

    def _bridge_connected(self, conn: BridgeLink) -> BridgeLink | None:
        with self._lock:
            old, self._conn = self._conn, conn
        return old

    def _bridge_gone(self, conn: BridgeLink) -> None:
        with self._lock:
            if self._conn is conn:
                self._conn = None
                self._kick()

    def _bridge_hello(self, conn: BridgeLink, pid: int | None) -> None:
        with self._lock:
            conn.bridge_pid = pid
            conn.generation = self._generation
            if self._bridge_generation == self._generation:
                log.warning("bridge for %s reconnected; resynchronising", self.identity.node)
                self._table.bridge_restarted()
            self._bridge_generation = self._generation
            self._kick()

    def _bridge_event(self, conn: BridgeLink, event: events.Event, seq: int) -> bool:
        with self._lock:
            if conn.generation != self._generation or not self._exabgp_alive:
                return False  # relayed from an ExaBGP that has exited: its sessions are gone
            return self._table.apply(event, seq)

    def _reload_acked(self) -> None:
        with self._lock:
            self._table.reload_acked()

    # ---- the worker (bgp.reconciler runs it and calls these with the lock held) ------------------------------

    def _ready_link(self) -> BridgeLink | None:
        """The bridge of the current ExaBGP, once it said hello."""
        conn = self._conn
        if conn is None or conn.bridge_pid is None or self._bridge_generation != self._generation:
            return None
        return conn

    def _ready_or_watch(self) -> BridgeLink | None:
        conn = self._ready_link()
        if conn is None:
            self._watchdog.check(self._proc)
        else:
            self._watchdog.connected()
        return conn

    def _link_lost(self, conn: BridgeLink) -> None:
        if self._conn is conn:
            self._conn = None

    def _worker_beat(self) -> None:
        self._beats["worker"] = time.monotonic()

    # ---- shared ----------------------------------------------------------------------------------------------

    def _kick(self) -> None:
        """Wake the worker (hold the lock)."""
        self._worker.kick()

    def _changed(self) -> None:
        for cb in list(self._callbacks):
            try:
                cb()
            except Exception:
                log.exception("BGP on_change callback failed")
