"""The speaker's side of the bridge (``bgp.bridge``, ExaBGP's API helper): the unix socket it connects to, one
reader thread per connection that splits its lines (hello, event, text, ack), and the watchdog that restarts an
ExaBGP whose bridge does not come. What the lines mean for sessions and routes is the handler's business."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bgp import commands, events
from bgp.link import BridgeLink

log = logging.getLogger("bgp.speaker")  # the speaker's messages, under the name operators filter on
# Per-hop timestamps for latency analysis (bench/routes_convergence.py --trace); off unless the owner enables it.
trace = logging.getLogger("podnet.trace.bgp")


@dataclass(frozen=True)
class BridgeHooks:
    """What the speaker does with the bridge's lines (each takes the speaker's lock itself)."""

    connected: Callable[[BridgeLink], BridgeLink | None]  # ``conn`` is the bridge now; returns the one it replaces
    gone: Callable[[BridgeLink], None]
    hello: Callable[[BridgeLink, int | None], None]
    event: Callable[[BridgeLink, events.Event, int], bool]  # apply an event; whether the owner should be told
    reload_acked: Callable[[], None]
    next_seq: Callable[[], int]  # the line's position in the stream of all bridges' lines
    changed: Callable[[], None]  # tell the owner


class BridgeServer:
    def __init__(self, path: Path, node: str, handler: BridgeHooks) -> None:
        self.path = path
        self.node = node
        self.handler = handler
        self._server: socket.socket | None = None
        self._open = False

    def listen(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(self.path))
        os.chmod(self.path, 0o600)
        server.listen(4)
        self._server = server
        self._open = True

    def close(self) -> None:
        self._open = False
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.shutdown(socket.SHUT_RDWR)
            self._server.close()

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def accept_loop(self) -> None:
        """The bridge thread: each connection replaces the previous one and gets a reader thread."""
        assert self._server is not None
        while self._open:
            try:
                sock, _ = self._server.accept()
            except OSError:
                return
            conn = BridgeLink(sock)
            old = self.handler.connected(conn)
            if old is not None:
                old.close()
            threading.Thread(target=self.read, args=(conn,), name=f"bgp-{self.node}-reader", daemon=True).start()

    def read(self, conn: BridgeLink) -> None:
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
                    notify |= self.line(conn, raw.decode(errors="replace"))
                if notify:
                    self.handler.changed()
        finally:
            conn.acks.put(None)
            self.handler.gone(conn)

    def line(self, conn: BridgeLink, line: str) -> bool:
        """One line from the bridge; whether the owner should be told."""
        kind, _, rest = line.partition(" ")
        seq = self.handler.next_seq()
        if kind == "ack":
            ok = rest.startswith("done")
            if conn.in_flight == commands.RELOAD:
                # Before the worker can send anything else: ExaBGP re-reads its file after this ack and before it
                # reads our next command, so the sessions it reports from now on are the reloaded ones.
                self.handler.reload_acked()
            conn.acks.put((ok, rest, conn.text, seq))
            conn.text = []
            return False
        if kind == "text":
            conn.text.append(rest)
            return False
        if kind == "hello":
            self.handler.hello(conn, int(rest) if rest.isdigit() else None)
            return True
        if kind == "event":
            log.debug("%s: event %s", self.node, rest)
            event = events.parse(rest)
            if isinstance(event, events.UpdateEvent) and trace.isEnabledFor(logging.DEBUG):
                changed = [r.prefix for r in event.announced] + list(event.withdrawn)
                trace.debug("update-recv %s from=%s", " ".join(changed[:5]), event.peer)
            if event is not None:
                return self.handler.event(conn, event, seq)
        return False


class BridgeWatchdog:
    """ExaBGP stops respawning a helper that keeps dying; without a bridge it is deaf to us, so restart it
    (SIGKILL: no NOTIFICATION, peers keep our routes over the restart)."""

    def __init__(self, node: str, timeout: float) -> None:
        self.node = node
        self.timeout = timeout
        self._since: float | None = None

    def connected(self) -> None:
        self._since = None

    def check(self, proc: subprocess.Popen[bytes] | None) -> None:
        """Called while no bridge is connected."""
        if proc is None or proc.poll() is not None:
            self._since = None
            return
        now = time.monotonic()
        if self._since is None:
            self._since = now
        elif now - self._since > self.timeout:
            log.warning("no bridge from ExaBGP for %s in %ss; restarting ExaBGP", self.node, self.timeout)
            self._since = None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
