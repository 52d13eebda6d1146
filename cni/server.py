"""`podnet-cni serve`: the node-local CNI server. It runs the same ``cni.plugin.run`` as the one-shot plugin, with
etcd connections, IPAM block caches and per-node allocation locks kept warm across requests.

One request per connection: the client sends a JSON object {"env": {...}, "stdin": "..."} and closes its write
side; the server answers {"code", "stdout", "stderr"}. The socket is created mode 0600 (root only: whoever can talk
to it can wire pods).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socketserver
import threading
from pathlib import Path
from typing import Any

from cni.main import DEFAULT_SOCKET
from cni.plugin import Clients, Outcome, run

log = logging.getLogger(__name__)
MAX_REQUEST = 1 << 20


class _Handler(socketserver.StreamRequestHandler):
    server: CniServer

    def handle(self) -> None:
        raw = self.rfile.read(MAX_REQUEST)
        try:
            request: Any = json.loads(raw)
            env = {str(k): str(v) for k, v in dict(request["env"]).items()}
            stdin = str(request["stdin"]).encode("utf-8", "surrogateescape")
        except (ValueError, KeyError, TypeError) as exc:
            outcome = Outcome(1, json.dumps({"cniVersion": "1.1.0", "code": 6, "msg": f"bad request: {exc}"}) + "\n")
        else:
            outcome = run(env, stdin, self.server.clients)
            log.info("%s %s -> %d", env.get("CNI_COMMAND", "?"), env.get("CNI_CONTAINERID", "-"), outcome.code)
        self.wfile.write(
            json.dumps({"code": outcome.code, "stdout": outcome.stdout, "stderr": outcome.stderr}).encode()
        )


class CniServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

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
