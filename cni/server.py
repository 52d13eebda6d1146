"""The node-local CNI server: the same ``cni.plugin.run`` as the one-shot plugin, with etcd connections, IPAM block
caches and per-node allocation locks kept warm across requests. ``podnet-cni serve`` (``cni.serve``) runs it as a
process; the agent embeds it:

    server = CniServer(path, clients=Clients(tls=...), stats=None)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2})  # the caller's thread
    ...  # server.last_progress: time.monotonic() of its last poll or request, for liveness; server.stats
    server.shutdown(); thread.join(); server.server_close()

One request per connection (``cni.wire``), each in its own thread. The socket is created mode 0600 (root only:
whoever can talk to it can wire pods).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socketserver
import time
from pathlib import Path

from cni.plugin import Clients, Outcome, run
from cni.stats import INVALID, CniStats
from cni.wire import MAX_REQUEST, STATS_COMMAND, encode_answer, parse_request

log = logging.getLogger(__name__)
_MALFORMED = '{"cniVersion": "1.1.0", "code": 6, "msg": "malformed request to the CNI server"}\n'


class _Handler(socketserver.StreamRequestHandler):
    server: CniServer

    def handle(self) -> None:
        server = self.server
        server.last_progress = time.monotonic()
        raw = self.rfile.read(MAX_REQUEST)
        started = time.perf_counter()
        parsed = parse_request(raw)
        if parsed is None:
            command = INVALID
            outcome = Outcome(1, _MALFORMED)
        elif parsed[0].get("CNI_COMMAND") == STATS_COMMAND:
            # The agent's metrics, when this server runs as its child: answered, not counted as a call.
            out = json.dumps(server.stats.to_json()).encode()
            self.wfile.write(encode_answer(0, out, b""))
            return
        else:
            env, stdin = parsed
            command = env.get("CNI_COMMAND", INVALID)
            outcome = run(env, stdin, server.clients)
            log.info(
                "%s %s -> %d in %.1f ms (%s)",
                env.get("CNI_COMMAND", "?"),
                env.get("CNI_CONTAINERID", "-"),
                outcome.code,
                (time.perf_counter() - started) * 1000,
                ", ".join(f"{name} {spent * 1000:.1f}" for name, spent in outcome.phases),
            )
        server.stats.record(command, time.perf_counter() - started, outcome.code == 0)
        self.wfile.write(encode_answer(outcome.code, outcome.stdout.encode(), outcome.stderr.encode()))
        server.last_progress = time.monotonic()


class CniServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Listening once constructed. ``clients``: the caller's etcd clients (kept open by ``server_close``; None: the
    server's own, closed with it). ``stats``: where calls are counted (None: a new ``CniStats``)."""

    daemon_threads = True
    request_queue_size = 128  # a node starting many pods at once must not see its connects refused

    def __init__(self, path: str, clients: Clients | None = None, stats: CniStats | None = None) -> None:
        self.path = path
        self._own_clients = clients is None
        self.clients = clients if clients is not None else Clients()
        self.stats = stats if stats is not None else CniStats()
        self.last_progress = time.monotonic()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale socket of a previous run
        old = os.umask(0o177)
        try:
            super().__init__(path, _Handler)
        finally:
            os.umask(old)

    def service_actions(self) -> None:
        # serve_forever calls this after every poll: the loop is alive even when no pod is being created.
        self.last_progress = time.monotonic()

    def server_close(self) -> None:
        super().server_close()
        if self._own_clients:
            self.clients.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
