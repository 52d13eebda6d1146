"""/healthz, /readiness and /metrics on loopback with real sockets, served for a supervisor of real component loops:
status codes and bodies as a probe, curl or Prometheus sees them, and a server that keeps answering whatever its
clients do (a client sending a byte a second, too many clients, garbage, oversized headers)."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.endpoints import HealthServer
from daemon.metrics import ComponentCollector, new_registry
from daemon.supervisor import Supervisor
from daemon.threads import Threads
from tests.unit.daemon_fake import Journal, LoopComponent, wait_for

pytestmark = pytest.mark.integration


@dataclass
class Daemon:
    sup: Supervisor
    http: HealthServer
    datastore: LoopComponent
    bgp: LoopComponent

    @property
    def port(self) -> int:
        return self.http.port


def make_daemon(**http_args: float) -> Daemon:
    threads = Threads()
    journal = Journal()
    registry = new_registry()
    datastore = LoopComponent("datastore", threads, journal)
    bgp = LoopComponent("bgp", threads, journal)
    sup = Supervisor([], threads, grace=5)
    server = HealthServer(sup.status, registry, threads, port=0, **http_args)  # type: ignore[arg-type]
    sup.add(server, datastore, bgp)  # the endpoints first: they answer while the others start, and stop last
    ComponentCollector(sup.status).register(registry)
    sup.start()
    return Daemon(sup, server, datastore, bgp)


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    d = make_daemon()
    try:
        yield d
    finally:
        d.sup.stop()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: str


def get(port: int, path: str, method: str = "GET", headers: dict[str, str] | None = None) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode())
    finally:
        conn.close()


def raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` as is and read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def metric(port: int, name: str, labels: dict[str, str]) -> float | None:
    for family in text_string_to_metric_families(get(port, "/metrics").body):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return None


# -- status codes and bodies -------------------------------------------------------------------------------------


def test_healthz_is_200_then_503_naming_the_component_whose_thread_died(daemon: Daemon) -> None:
    wait_for(lambda: daemon.sup.status().ready)
    ok = get(daemon.port, "/healthz")
    assert ok.status == 200
    assert ok.headers["content-type"] == "text/plain; charset=utf-8"
    assert ok.body.splitlines()[0] == "live"

    daemon.bgp.crash.set()
    wait_for(lambda: get(daemon.port, "/healthz").status == 503)
    bad = get(daemon.port, "/healthz")
    assert bad.body.splitlines()[0] == "not live: bgp: thread bgp-loop died: RuntimeError: boom in bgp"
    as_json = json.loads(get(daemon.port, "/healthz?format=json").body)
    assert as_json["live"] is False
    (bgp,) = [c for c in as_json["components"] if c["name"] == "bgp"]
    assert bgp["thread_deaths"] == [{"thread": "bgp-loop", "error": "RuntimeError: boom in bgp"}]
    # A dead component is not ready either.
    assert get(daemon.port, "/readiness").status == 503
    assert metric(daemon.port, "podnet_component_thread_deaths_total", {"component": "bgp"}) == 1
    assert metric(daemon.port, "podnet_component_live", {"component": "bgp"}) == 0


def test_healthz_503_names_a_wedged_component() -> None:
    d = make_daemon()
    try:
        d.datastore.heartbeat.set_timeout(0.3)
        d.datastore.wedge.set()
        wait_for(lambda: get(d.port, "/healthz").status == 503)
        head = get(d.port, "/healthz").body.splitlines()[0]
        assert head.startswith("not live: datastore: no progress for ")
        assert "(liveness timeout 0.3 s)" in head
        assert "bgp" not in head
    finally:
        d.sup.stop()


def test_readiness_table_text_and_json(daemon: Daemon) -> None:
    daemon.bgp.report(False, "bgp: 0 of 2 peers established")
    wait_for(lambda: daemon.sup.status().components[1].ready)

    r = get(daemon.port, "/readiness")
    assert r.status == 503
    lines = r.body.splitlines()
    assert lines[0] == "not ready: bgp"
    rows = {line.split()[0]: line for line in lines[2:]}
    assert set(rows) == {"http", "datastore", "bgp"}
    assert rows["bgp"].split()[2:4] == ["yes", "no"]
    assert rows["bgp"].endswith("bgp: 0 of 2 peers established")
    assert rows["http"].endswith(f"serving on 127.0.0.1:{daemon.port}")

    for asked in (
        get(daemon.port, "/readiness?format=json"),
        get(daemon.port, "/readiness", headers={"Accept": "application/json"}),
    ):
        assert asked.status == 503
        assert asked.headers["content-type"] == "application/json"
        doc = json.loads(asked.body)
        assert doc["ready"] is False and doc["live"] is True
        by_name = {c["name"]: c for c in doc["components"]}
        assert by_name["bgp"]["reason"] == "bgp: 0 of 2 peers established"
        assert by_name["bgp"]["ready"] is False
        assert by_name["datastore"]["ready"] is True
        assert by_name["datastore"]["liveness_timeout_seconds"] == 5.0

    daemon.bgp.report(True, "bgp: 2 of 2 peers established")
    wait_for(lambda: get(daemon.port, "/readiness").status == 200)
    assert get(daemon.port, "/readiness").body.splitlines()[0] == "ready"


def test_unknown_paths_404_other_methods_501_head_has_no_body(daemon: Daemon) -> None:
    for path in ("/", "/healthz/x", "/metricsx", "/../etc/passwd"):
        r = get(daemon.port, path)
        assert r.status == 404, path
        assert "endpoints: /healthz /readiness /metrics" in r.body
    assert get(daemon.port, "/readiness", method="POST").status == 501
    head = get(daemon.port, "/healthz", method="HEAD")
    assert head.status == 200 and head.body == "" and int(head.headers["content-length"]) > 0
    counted = metric(daemon.port, "podnet_health_http_requests_total", {"endpoint": "other", "code": "404"})
    assert counted == 4


def test_stopping_closes_the_port() -> None:
    d = make_daemon()
    port = d.port
    assert get(port, "/healthz").status == 200
    d.sup.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_the_endpoints_answer_while_the_others_stop_and_close_last() -> None:
    d = make_daemon()
    d.bgp.hang_on_stop = True
    try:
        wait_for(lambda: d.sup.status().ready)
        stopper = threading.Thread(target=d.sup.stop, args=(time.monotonic() + 3.0,), daemon=True)
        stopper.start()
        wait_for(lambda: d.sup.status().components[2].state.value == "stopping")
        r = get(d.port, "/readiness")
        assert r.status == 503
        assert r.body.splitlines()[0] == "not ready: bgp"  # stopping (the first in reverse order), and hanging
        assert get(d.port, "/healthz").status == 200  # stopping is not dead
        stopper.join(5)
        assert not stopper.is_alive()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", d.port), timeout=2).close()
    finally:
        d.bgp.unblock.set()
        d.sup.stop()


def test_parallel_clients_under_the_cap_are_all_answered(daemon: Daemon) -> None:
    codes: list[int] = []
    lock = threading.Lock()

    def client() -> None:
        for _ in range(25):
            status = get(daemon.port, "/healthz").status
            with lock:
                codes.append(status)

    clients = [threading.Thread(target=client) for _ in range(8)]
    for c in clients:
        c.start()
    for c in clients:
        c.join(30)
    assert codes == [200] * 200


def test_a_port_in_use_fails_start_naming_the_address(daemon: Daemon) -> None:
    other = HealthServer(daemon.sup.status, new_registry(), Threads(), port=daemon.port)
    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{daemon.port} for /healthz"):
        other.start()


# -- /metrics ------------------------------------------------------------------------------------------------------


def test_metrics_parse_and_carry_component_and_process_figures(daemon: Daemon) -> None:
    wait_for(lambda: daemon.sup.status().ready)
    r = get(daemon.port, "/metrics")
    assert r.status == 200
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = {f.name: f for f in text_string_to_metric_families(r.body)}
    assert {"podnet_component_live", "podnet_component_ready", "podnet_component_progress_age_seconds"} <= set(families)
    assert families["podnet_component_thread_deaths"].type == "counter"
    live = {s.labels["component"]: s.value for s in families["podnet_component_live"].samples}
    assert live == {"http": 1.0, "datastore": 1.0, "bgp": 1.0}
    assert families["process_cpu_seconds"].samples[0].value > 0
    assert families["process_resident_memory_bytes"].samples[0].value > 10 * 2**20
    # Everything of ours is podnet_; the only others are the standard process_ metrics.
    assert {n.split("_")[0] for n in families} == {"podnet", "process"}


def test_metrics_pass_promtool_check_metrics(daemon: Daemon) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: scripts/bootstrap installs it (Debian package prometheus)")
    get(daemon.port, "/nope")  # so that the request counter has a sample
    text = get(daemon.port, "/metrics").body
    assert "podnet_health_http_requests_total" in text
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout + proc.stderr == ""  # no lint warning either


# -- clients that misbehave ------------------------------------------------------------------------------------------


def test_a_slowloris_client_does_not_hold_up_other_requests_and_is_cut_off() -> None:
    d = make_daemon(request_timeout=3.0)
    try:
        slow = socket.create_connection(("127.0.0.1", d.port), timeout=10)
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        outcome: list[str] = []

        def drip() -> None:
            try:
                for b in request:
                    slow.send(bytes([b]))
                    time.sleep(1.0)  # one byte a second: each read is quick, the request never completes
                outcome.append("sent it all")
            except OSError as e:
                outcome.append(f"cut off: {e}")

        dripper = threading.Thread(target=drip, daemon=True)
        t0 = time.monotonic()
        dripper.start()
        worst = 0.0
        while time.monotonic() - t0 < 3.5:
            t = time.monotonic()
            assert get(d.port, "/readiness").status in (200, 503)
            worst = max(worst, time.monotonic() - t)
            time.sleep(0.05)
        assert worst < 1.0  # a request held up behind the dripping one would wait for its 3 s

        # The server gave the dripping client 3 s for its whole request: answered 408 and closed.
        slow.settimeout(5)
        answer = slow.recv(4096)
        assert answer.startswith(b"HTTP/1.0 408"), answer
        assert time.monotonic() - t0 < 5.0
        dripper.join(10)
        assert outcome and outcome[0].startswith("cut off"), outcome  # it could not drip its request to the end
        slow.close()
        assert metric(d.port, "podnet_health_http_dropped_connections_total", {"reason": "timeout"}) == 1
    finally:
        d.sup.stop()


def test_connections_over_the_cap_get_503_at_once_and_service_resumes() -> None:
    d = make_daemon(max_connections=2, request_timeout=30)
    try:
        idle = [socket.create_connection(("127.0.0.1", d.port), timeout=5) for _ in range(2)]
        for s in idle:
            s.send(b"GET /he")  # half a request line: each holds a handler thread
        time.sleep(0.2)
        t = time.monotonic()
        answer = raw(d.port, b"GET /healthz HTTP/1.0\r\n\r\n")
        assert time.monotonic() - t < 1.0  # not queued behind the two (each may hold its slot for 30 s)
        assert answer.startswith(b"HTTP/1.0 503 Service Unavailable"), answer
        assert answer.endswith(b"503 too many connections\n")
        for s in idle:
            s.close()
        wait_for(lambda: raw(d.port, b"GET /healthz HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200"))
        # At least the one above (a retry may have come before a closed client's handler had ended).
        busy = metric(d.port, "podnet_health_http_dropped_connections_total", {"reason": "busy"})
        assert busy is not None and busy >= 1
    finally:
        d.sup.stop()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n", b"400"),  # a TLS client hello
        (b"GET /healthz HTTP/1.1 extra\r\n\r\n", b"400"),
        (b"GET /healthz HTTP/9.9\r\n\r\n", b"505"),
        (b"\xff\xfe\x00\x00\r\n\r\n", b"400"),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 20000 + b"\r\n\r\n", b"431"),
        (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n", b"431"),
    ],
)
def test_garbage_gets_an_error_and_the_server_keeps_serving(
    daemon: Daemon, request_bytes: bytes, status: bytes
) -> None:
    answer = raw(daemon.port, request_bytes)
    assert answer.split(b" ", 2)[1] == status, answer[:200]
    assert get(daemon.port, "/healthz").status == 200
