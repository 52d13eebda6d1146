"""``/healthz``, ``/readiness`` and ``/metrics`` over HTTP, as a component of the daemon.

What a probe or a scraper sees (docs/daemon.md): ``/healthz`` 200 while every component is live, else 503 naming the
wedged or dead one; ``/readiness`` 200 when every component is ready, else 503 with a table of components and the
reason for each (``?format=json`` or ``Accept: application/json`` for JSON); ``/metrics`` in Prometheus text format;
any other path 404.

The server must keep answering whatever its clients do, and never wait on the components: a health read is one
``Supervisor.status()`` (cheap reads of each component's ``Health``). Against clients: one request per connection
(HTTP/1.0 semantics: the server closes after answering); the request line and headers must arrive within
``request_timeout`` in total (a per-read timeout alone would let a client sending a byte a second hold a thread
forever) and within ``max_request_bytes``; at most ``max_connections`` are served at once, and a connection over
that is answered 503 at once and closed instead of queueing behind the others.
"""

from __future__ import annotations

import io
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from daemon import report
from daemon.component import Health, Heartbeat
from daemon.supervisor import Status
from daemon.threads import Threads, stop_server

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9099
PATHS = ("/healthz", "/readiness", "/metrics")
TEXT = "text/plain; charset=utf-8"
JSON = "application/json"


class _TooLarge(Exception):
    pass


class _Late(Exception):
    pass


class _BoundedReader(io.RawIOBase):
    """The connection's input, refused past a deadline for the whole request and past a byte budget."""

    def __init__(self, sock: socket.socket, deadline: float, limit: int) -> None:
        self._sock = sock
        self._deadline = deadline
        self._left = limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise _Late
        if self._left <= 0:
            raise _TooLarge
        self._sock.settimeout(remaining)
        try:
            n = self._sock.recv_into(memoryview(buffer)[: self._left])
        except TimeoutError:
            raise _Late from None
        self._left -= n
        return n


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "podnet_health_http_requests",
            "Requests answered by the health and metrics endpoints, by endpoint and status code",
            ["endpoint", "code"],
            registry=registry,
        )
        self.dropped = Counter(
            "podnet_health_http_dropped_connections",
            "Connections closed without serving a request: too many at once (busy), too slow (timeout), "
            "request too large (too_large)",
            ["reason"],
            registry=registry,
        )


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    error_message_format = "%(code)d %(message)s\n"
    error_content_type = TEXT
    default_request_version = "HTTP/1.0"  # errors before the version is parsed still get a status line

    def setup(self) -> None:
        super().setup()
        srv = self.server
        reader = _BoundedReader(self.connection, time.monotonic() + srv.request_timeout, srv.max_request_bytes)
        self.rfile = io.BufferedReader(reader)
        # What send_error and the request log read; set only once a request line was parsed.
        self.requestline, self.command, self.request_version = "", "", self.default_request_version

    def handle(self) -> None:
        self.close_connection = True
        try:
            self.handle_one_request()
        except _Late:
            self.server.metrics.dropped.labels("timeout").inc()
            self._best_effort_error(408, "Request Timeout")
        except _TooLarge:
            self.server.metrics.dropped.labels("too_large").inc()
            self._best_effort_error(431, "Request Header Fields Too Large")
        except OSError as e:
            log.debug("health endpoint: connection from %s: %s", self.client_address, e)

    def _best_effort_error(self, code: int, message: str) -> None:
        try:
            self.connection.settimeout(1.0)
            self.send_error(code, message)
        except OSError:
            pass

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _serve(self, body: bool) -> None:
        self.connection.settimeout(self.server.request_timeout)  # for writing: a client that does not read
        url = urlsplit(self.path)
        endpoint = url.path if url.path in PATHS else "other"
        try:
            code, ctype, payload = self._answer(url.path, parse_qs(url.query))
        except Exception as e:  # a broken collector or status must not kill the endpoint for the next request
            log.exception("health endpoint: %s failed", url.path)
            code, ctype, payload = 500, TEXT, f"500 {type(e).__name__}: {e}\n".encode()
        self.server.metrics.requests.labels(endpoint, str(code)).inc()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def _answer(self, path: str, query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        if path == "/metrics":
            return 200, CONTENT_TYPE_PLAIN_0_0_4, generate_latest(self.server.registry)
        if path not in ("/healthz", "/readiness"):
            return 404, TEXT, f"404 not found: {path}; endpoints: {' '.join(PATHS)}\n".encode()
        status = self.server.status()
        ok = status.live if path == "/healthz" else status.ready
        code = 200 if ok else 503
        if "json" in query.get("format", ()) or JSON in self.headers.get("Accept", ""):
            return code, JSON, report.to_json(status).encode()
        text = report.liveness_text(status) if path == "/healthz" else report.readiness_text(status)
        return code, TEXT, text.encode()

    def log_message(self, format: str, *args: Any) -> None:
        # Probes every few seconds and garbage from port scanners: not worth a line at the default level.
        log.debug("health endpoint: %s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a handler thread never holds the process up at exit (each is bounded by its deadline)

    def __init__(
        self,
        host: str,
        port: int,
        *,
        status: Callable[[], Status],
        registry: CollectorRegistry,
        metrics: _Metrics,
        request_timeout: float,
        max_request_bytes: int,
        max_connections: int,
        on_tick: Callable[[], None],
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.status = status
        self.registry = registry
        self.metrics = metrics
        self.request_timeout = request_timeout
        self.max_request_bytes = max_request_bytes
        self._slots = threading.BoundedSemaphore(max_connections)
        self._on_tick = on_tick
        super().__init__((host, port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host's name up in DNS (getfqdn): slow or hanging on a node without DNS.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.metrics.dropped.labels("busy").inc()
            _refuse(request)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("health endpoint: error serving %s", client_address, exc_info=True)

    def service_actions(self) -> None:
        super().service_actions()
        self._on_tick()  # the accept loop goes round at least every poll interval: that is its heartbeat


def _refuse(request: socket.socket) -> None:
    """Answer a connection over the cap without reading it and without waiting for the client."""
    try:
        request.setblocking(False)
        request.send(
            b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Connection: close\r\n\r\n503 too many connections\n"
        )
    except OSError:
        pass


class HealthServer:
    """The endpoints as a daemon component (start it first, so that probes answer while the others start; the
    supervisor then stops it last)."""

    POLL_INTERVAL = 0.5

    def __init__(
        self,
        status: Callable[[], Status],
        registry: CollectorRegistry,
        threads: Threads,
        *,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        request_timeout: float = 5.0,
        max_request_bytes: int = 8192,
        max_connections: int = 16,
        liveness_timeout: float = 10.0,
        name: str = "http",
    ) -> None:
        self._name = name
        self._status = status
        self._registry = registry
        self._threads = threads
        self.host = host
        self._port = port
        self.request_timeout = request_timeout
        self.max_request_bytes = max_request_bytes
        self.max_connections = max_connections
        self._heartbeat = Heartbeat(liveness_timeout, reason="not listening yet")
        self._metrics = _Metrics(registry)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        return self._name

    @property
    def port(self) -> int:
        """The port it listens on (the one the kernel chose, if it was asked for port 0)."""
        return self._server.server_port if self._server is not None else self._port

    def start(self) -> None:
        try:
            server = _Server(
                self.host,
                self._port,
                status=self._status,
                registry=self._registry,
                metrics=self._metrics,
                request_timeout=self.request_timeout,
                max_request_bytes=self.max_request_bytes,
                max_connections=self.max_connections,
                on_tick=self._heartbeat.beat,
            )
        except OSError as e:
            raise OSError(e.errno, f"cannot listen on {self.host}:{self._port} for /healthz: {e.strerror}") from e
        self._server = server
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._heartbeat.beat(ready=True, reason=f"serving on {host}:{self.port}")
        self._thread = self._threads.spawn(
            self._name, f"{self._name}-serve", lambda: server.serve_forever(self.POLL_INTERVAL)
        )

    def stop(self, deadline: float) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._threads.stopping(self._name)
        self._heartbeat.set(ready=False, reason="stopped")
        stop_server(server, thread, deadline)

    def health(self) -> Health:
        return self._heartbeat.snapshot()
