"""The CNI server as a component the agent embeds: it serves on the caller's thread, counts every call (latency
histograms of ADD/DEL/CHECK, errors by command), shows liveness while idle, stops on shutdown and removes its
socket, and leaves the caller's etcd clients open. Calls that need no etcd or kernel (VERSION, invalid input)
through the real thin client over a real unix socket; no root."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cni import main as client
from cni import wire
from cni.plugin import Clients
from cni.server import CniServer
from cni.stats import BUCKETS, CniStats, Histogram


class RecordingClients(Clients):
    closed = False

    def close(self) -> None:
        self.closed = True
        super().close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[CniServer, RecordingClients, CniStats]]:
    clients, stats = RecordingClients(), CniStats()
    server = CniServer(str(tmp_path / "run" / "cni.sock"), clients=clients, stats=stats)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server, clients, stats
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()


def call(server: CniServer, env: dict[str, str], stdin: bytes = b"") -> tuple[int, bytes, bytes]:
    answer = client.forward(server.path, env, stdin)
    assert answer is not None, "the server did not accept the connection"
    return answer


def test_calls_are_answered_and_counted(served: tuple[CniServer, RecordingClients, CniStats]) -> None:
    server, _, stats = served
    assert server.stats is stats
    code, out, _ = call(server, {"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "1.0.0"}')
    assert code == 0 and json.loads(out)["cniVersion"] == "1.0.0"
    # ADD and DEL that fail before any etcd or kernel work: no container ID.
    code, out, err = call(server, {"CNI_COMMAND": "ADD", "CNI_IFNAME": "eth0"}, b"{}")
    assert code == 1 and json.loads(out)["code"] == 4 and b"CNI_CONTAINERID" in err
    call(server, {"CNI_COMMAND": "DEL", "CNI_IFNAME": "eth0"}, b"{}")
    call(server, {"CNI_COMMAND": "DEL", "CNI_IFNAME": "eth0"}, b"{}")
    raw = client.forward(server.path, {}, b"")  # no CNI_COMMAND at all
    assert raw is not None and raw[0] == 1

    assert stats.requests() == {"ADD": 1, "DEL": 2, "CHECK": 0, "VERSION": 1, "STATUS": 0, "GC": 0, "INVALID": 1}
    assert stats.errors() == {"ADD": 1, "DEL": 2, "CHECK": 0, "VERSION": 0, "STATUS": 0, "GC": 0, "INVALID": 1}
    add = stats.latency["ADD"].snapshot()
    assert add.bounds == BUCKETS == (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
    assert add.samples == 1 and add.cumulative[-1] == 1 and 0 < add.sum < 10
    assert stats.latency["DEL"].snapshot().samples == 2
    assert stats.latency["CHECK"].snapshot() == (BUCKETS, (0,) * len(BUCKETS), 0.0, 0)


def test_a_malformed_request_is_answered_and_counted_invalid(
    served: tuple[CniServer, RecordingClients, CniStats],
) -> None:
    import socket

    server, _, stats = served
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(server.path)
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        answer = sock.makefile("rb").read()
    code, out, _ = client.decode_answer(answer)
    assert code == 1 and json.loads(out)["code"] == 6
    assert stats.errors()["INVALID"] == 1


def test_last_progress_moves_while_idle(served: tuple[CniServer, RecordingClients, CniStats]) -> None:
    server, _, _ = served
    first = server.last_progress
    time.sleep(0.3)
    assert server.last_progress > first  # polls alone count as progress: an idle node is not a wedged server


def test_shutdown_stops_serving_removes_the_socket_and_leaves_the_callers_clients(tmp_path: Path) -> None:
    clients = RecordingClients()
    server = CniServer(str(tmp_path / "cni.sock"), clients=clients)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    assert call(server, {"CNI_COMMAND": "VERSION"})[0] == 0
    server.shutdown()
    thread.join(5)
    assert not thread.is_alive()
    server.server_close()
    assert not Path(server.path).exists()
    assert client.forward(server.path, {"CNI_COMMAND": "VERSION"}, b"") is None
    assert not clients.closed  # the caller's: the agent closes them when it stops
    own = CniServer(str(tmp_path / "own.sock"))
    own.server_close()  # its own clients are closed with it (nothing to assert beyond no error)


def test_the_python_client_and_the_server_speak_the_same_protocol() -> None:
    assert (client.MAGIC, client.DEFAULT_SOCKET) == (wire.MAGIC, wire.DEFAULT_SOCKET)
    env = {"CNI_COMMAND": "ADD", "CNI_ARGS": "K8S_POD_NAME=a=b;X=1", "PODNET_TEST_X": ""}
    assert wire.parse_request(client.encode_request(env, b'{"x": "\\u0000"}')) == (env, b'{"x": "\\u0000"}')
    assert client.decode_answer(wire.encode_answer(7, b"out\n", b"err")) == (7, b"out\n", b"err")


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    h = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        h.observe(value)
    assert h.snapshot() == ((0.1, 1.0), (2, 3), pytest.approx(3.65), 4)


def test_a_stats_request_is_answered_with_the_counts_and_not_counted(
    served: tuple[CniServer, RecordingClients, CniStats],
) -> None:
    """How the agent reads the counts of its CNI server child (``daemon.components.cni``)."""
    from cni.stats import StatsCopy

    server, _, stats = served
    call(server, {"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "1.0.0"}')
    code, out, _ = call(server, {"CNI_COMMAND": wire.STATS_COMMAND})
    assert code == 0
    copy = StatsCopy(json.loads(out))
    assert copy.requests()["VERSION"] == 1 and copy.requests() == stats.requests()
    assert sum(stats.requests().values()) == 1, "the stats request itself was counted"
    assert wire.parse_answer(wire.encode_answer(3, b"out", b"err")) == (3, b"out", b"err")
    assert wire.parse_request(wire.encode_request({"A": "1"}, b"in")) == ({"A": "1"}, b"in")
