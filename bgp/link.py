"""The speaker's end of the bridge connection: one command at a time, each answered by ExaBGP's ack."""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)

ACK_TIMEOUT = 35.0  # longer than the bridge's own, so the bridge gives up first


class BridgeLost(Exception):
    pass


class BridgeLink:
    """The bridge's connection: commands out, acks (with any command output) back."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        # (ok, reason, command output, the ack's position in the stream of lines read from the bridge)
        self.acks: queue.Queue[tuple[bool, str, list[str], int] | None] = queue.Queue()
        self.text: list[str] = []
        self.bridge_pid: int | None = None
        self.generation = -1  # the ExaBGP process (Speaker's generation) this bridge belongs to; set on hello
        self.in_flight: str | None = None  # the command waiting for its ack (one at a time)
        self.last_ack_seq = 0  # position of the last ack ``call`` returned: what came before it, ExaBGP wrote first
        self.closed = False

    def call(self, line: str, on_sent: Callable[[], None] | None = None) -> tuple[bool, list[str]]:
        """Send one command and wait for its ack; ``on_sent`` runs once the line is on its way."""
        self.in_flight = line
        try:
            self.sock.sendall((line + "\n").encode())
        except OSError:
            raise BridgeLost() from None
        if on_sent is not None:
            on_sent()
        try:
            ack = self.acks.get(timeout=ACK_TIMEOUT)
        except queue.Empty:
            raise BridgeLost() from None
        if ack is None:
            raise BridgeLost()
        ok, why, text, self.last_ack_seq = ack
        if not ok:
            log.warning("ExaBGP refused %r: %s", line, why)
        return ok, text

    def close(self) -> None:
        self.closed = True
        self.acks.put(None)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
