"""`podnet-cni serve`: the node-local CNI server. It runs the same ``cni.plugin.run`` as the one-shot plugin, with
etcd connections, IPAM block caches and per-node allocation locks kept warm across requests.

One request per connection: the client sends its env and stdin (format in ``cni.main``) and closes its write side;
the server answers exit code, stdout and stderr. The socket is created mode 0600 (root only: whoever can talk
to it can wire pods).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socketserver
import threading
import time
from pathlib import Path

from cni.main import DEFAULT_SOCKET, MAGIC
from cni.plugin import Clients, Outcome, run

log = logging.getLogger(__name__)
MAX_REQUEST = 1 << 20


class _Handler(socketserver.StreamRequestHandler):
    server: CniServer

    def handle(self) -> None:
        raw = self.rfile.read(MAX_REQUEST)
        parsed = parse_request(raw)
        if parsed is None:
            outcome = Outcome(1, '{"cniVersion": "1.1.0", "code": 6, "msg": "malformed request to the CNI server"}\n')
        else:
            env, stdin = parsed
            started = time.perf_counter()
            outcome = run(env, stdin, self.server.clients)
            log.info(
                "%s %s -> %d in %.1f ms (%s)",
                env.get("CNI_COMMAND", "?"),
                env.get("CNI_CONTAINERID", "-"),
                outcome.code,
                (time.perf_counter() - started) * 1000,
                ", ".join(f"{name} {spent * 1000:.1f}" for name, spent in outcome.phases),
            )
        out = outcome.stdout.encode()
        self.wfile.write(b"%d %d\n" % (outcome.code, len(out)) + out + outcome.stderr.encode())


def parse_request(raw: bytes) -> tuple[dict[str, str], bytes] | None:
    """The client's env and stdin (see ``cni.main`` for the format), or None if malformed."""
    if not raw.startswith(MAGIC):
        return None
    body = raw[len(MAGIC) :]
    env: dict[str, str] = {}
    pos = 0
    while True:
        end = body.find(b"\0", pos)
        if end < 0:
            return None
        if end == pos:
            return env, body[end + 1 :]
        key, sep, value = body[pos:end].decode("utf-8", "replace").partition("=")
        if not sep:
            return None
        env[key] = value
        pos = end + 1


class CniServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    request_queue_size = 128  # a node starting many pods at once must not see its connects refused

    def __init__(self, path: str) -> None:
        self.path = path
        self.clients = Clients()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale socket of a previous run
        old = os.umask(0o177)
        try:
            super().__init__(path, _Handler)
        finally:
            os.umask(old)

    def server_close(self) -> None:
        super().server_close()
        self.clients.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def serve_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="podnet-cni serve", description="Run the node-local podnet CNI server.")
    parser.add_argument("--socket", default=os.environ.get("PODNET_CNI_SOCKET", DEFAULT_SOCKET))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = CniServer(args.socket)

    def stop(*_: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"ready {args.socket}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    return 0
