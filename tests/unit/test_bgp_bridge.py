"""The bridge process on its own: we play ExaBGP (its stdin/stdout) and the speaker (its unix socket)."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

EVENT = '{ "exabgp": "5.0.0", "type": "state", "neighbor": { "address": { "peer": "10.0.0.2" }, "state": "up" } }'


class Ends:
    def __init__(self, proc: subprocess.Popen[str], server: socket.socket, conn: socket.socket) -> None:
        self.proc = proc
        self.server = server
        self.conn = conn
        self.reader = conn.makefile("r")

    def from_bridge(self) -> str:
        return self.reader.readline().rstrip("\n")

    def to_bridge(self, line: str) -> None:
        self.conn.sendall((line + "\n").encode())

    def exabgp_reads(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().rstrip("\n")

    def exabgp_says(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()


@pytest.fixture
def ends(tmp_path: Path) -> Iterator[Ends]:
    path = str(tmp_path / "b.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    server.settimeout(10)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bgp.bridge", path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        conn, _ = server.accept()
        conn.settimeout(10)
        yield Ends(proc, server, conn)
        conn.close()
    finally:
        proc.kill()
        proc.wait()
        server.close()


def test_commands_are_validated_and_acked_one_at_a_time(ends: Ends) -> None:
    assert ends.from_bridge() == f"hello {ends.proc.pid}"
    ends.to_bridge("shutdown")
    assert ends.from_bridge().startswith("ack error not a command podnet sends")
    good = "neighbor 10.0.0.2 announce route 10.244.1.0/26 next-hop 10.0.0.1"
    ends.to_bridge(good)
    assert ends.exabgp_reads() == good  # only the valid line reached ExaBGP
    ends.exabgp_says(EVENT)  # an event before the ack is relayed at once
    assert ends.from_bridge() == "event " + EVENT
    ends.exabgp_says("done")
    assert ends.from_bridge() == "ack done"
    ends.to_bridge("show neighbor json")
    assert ends.exabgp_reads() == "show neighbor json"
    ends.exabgp_says('[ { "peer": { "address": "10.0.0.2" } } ]')
    ends.exabgp_says("error")
    assert ends.from_bridge() == 'text [ { "peer": { "address": "10.0.0.2" } } ]'
    assert ends.from_bridge() == "ack error ExaBGP refused the command"


def test_events_wait_for_the_speaker_and_exabgp_leaving_ends_the_bridge(ends: Ends, tmp_path: Path) -> None:
    assert ends.from_bridge().startswith("hello ")
    path = tmp_path / "b.sock"
    ends.server.close()
    path.unlink()
    ends.reader.close()
    ends.conn.close()  # the speaker goes away
    ends.exabgp_says(EVENT)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    server.settimeout(10)
    conn, _ = server.accept()  # the bridge reconnects...
    conn.settimeout(10)
    reader = conn.makefile("r")
    assert reader.readline().startswith("hello ")
    assert reader.readline().rstrip("\n") == "event " + EVENT  # ...and delivers what it buffered
    assert ends.proc.stdin is not None
    ends.proc.stdin.close()  # ExaBGP exits
    assert ends.proc.wait(timeout=10) == 0
    conn.close()
    server.close()
