"""The ExaBGP API helper: ``python -m bgp.bridge SOCKET``. ExaBGP runs it as its API process (stdin: ExaBGP's
JSON events and acks; stdout: commands). It connects to the speaker's unix socket and relays, one line each:

    speaker -> bridge   a command (validated here: anything else gets ``ack error`` and never reaches ExaBGP)
    bridge -> speaker   ``hello <pid>`` once per connection
                        ``event <json>`` for each ExaBGP event (buffered while the speaker is away)
                        ``text <line>`` for a command's output (e.g. ``show neighbor json``)
                        ``ack done`` / ``ack error <why>`` when ExaBGP acknowledged (or refused) the command

Commands go to ExaBGP one at a time: the next is read only after ExaBGP's ``done``/``error`` for the previous.
If ExaBGP stays silent past the ack timeout the bridge exits, so that ExaBGP respawns a fresh one rather than
acks and commands drifting out of step.
"""

from __future__ import annotations

import collections
import os
import queue
import socket
import sys
import threading
import time

from bgp.commands import CommandError, validate

ACK_TIMEOUT = 30.0
BUFFERED_EVENTS = 200_000


class Bridge:
    def __init__(self, path: str) -> None:
        self.path = path
        self.acks: queue.Queue[str] = queue.Queue()
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.backlog: collections.deque[str] = collections.deque(maxlen=BUFFERED_EVENTS)

    def send(self, line: str) -> None:
        """Send to the speaker; events are kept for the next connection while there is none."""
        with self.lock:
            if self.sock is not None:
                try:
                    self.sock.sendall((line + "\n").encode())
                    return
                except OSError:
                    self._drop()
            if line.startswith("event "):
                self.backlog.append(line)

    def _drop(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def read_exabgp(self) -> None:
        for raw in sys.stdin:
            line = raw.rstrip("\n")
            if line in ("done", "error"):
                self.acks.put(line)
            elif line.startswith("{") and '"exabgp"' in line:  # events carry ExaBGP's version; output does not
                self.send("event " + line)
            elif line:
                self.send("text " + line)
        os._exit(0)  # ExaBGP went away: nothing left to relay

    def connect(self) -> socket.socket:
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
            except OSError:
                sock.close()
                time.sleep(0.1)
                continue
            with self.lock:
                sock.sendall(f"hello {os.getpid()}\n".encode())
                while self.backlog:
                    sock.sendall((self.backlog.popleft() + "\n").encode())
                self.sock = sock
            return sock

    def command(self, line: str) -> None:
        try:
            validate(line)
        except CommandError as exc:
            self.send(f"ack error {exc}")
            return
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        try:
            ack = self.acks.get(timeout=ACK_TIMEOUT)
        except queue.Empty:
            self.send("ack error ExaBGP did not acknowledge the command")
            os._exit(3)
        self.send("ack done" if ack == "done" else "ack error ExaBGP refused the command")

    def serve(self) -> None:
        threading.Thread(target=self.read_exabgp, name="exabgp-reader", daemon=True).start()
        while True:
            sock = self.connect()
            buf = b""
            while True:
                try:
                    chunk = sock.recv(65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    with self.lock:
                        if self.sock is sock:
                            self._drop()
                    break
                buf += chunk
                while b"\n" in buf:
                    raw, buf = buf.split(b"\n", 1)
                    self.command(raw.decode(errors="replace").strip())


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python -m bgp.bridge SOCKET\n")
        return 2
    Bridge(argv[0]).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
