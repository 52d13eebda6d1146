"""Entry point of `podnet-cni`: a thin client that hands the request to the node's CNI server, or runs it itself.

The container runtime starts a fresh process per call. Importing grpc and the etcd stubs costs ~0.25 s here, which
alone would break the ADD latency target under concurrency, so this module imports only the standard library: it
forwards env + stdin over a unix socket to ``podnet-cni serve`` (long-running, connections and block cache warm)
and prints its answer. When no server listens it runs the plugin in-process (slower, same result), so a node
without the server still works.

``podnet-cni serve [--socket PATH]`` runs the server.
"""

from __future__ import annotations

import json
import os
import socket
import sys

DEFAULT_SOCKET = "/run/podnet/cni.sock"
# How long the client waits for the server's answer; the runtime's own timeout is usually longer.
ANSWER_TIMEOUT = 120.0


def socket_path(env: dict[str, str], stdin: bytes) -> str:
    """The server's socket: ``serverSocket`` in the network config, else $PODNET_CNI_SOCKET, else the default."""
    try:
        conf = json.loads(stdin)
        if isinstance(conf, dict) and isinstance(conf.get("serverSocket"), str):
            return str(conf["serverSocket"])
    except ValueError:
        pass  # the plugin reports the bad config; the client only routes
    return env.get("PODNET_CNI_SOCKET") or DEFAULT_SOCKET


def forward(path: str, env: dict[str, str], stdin: bytes) -> tuple[int, str, str] | None:
    """Send the request to the server. None if no server accepts it (then the caller runs the plugin itself)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(2.0)
        try:
            sock.connect(path)
        except OSError:
            return None
        sock.settimeout(ANSWER_TIMEOUT)
        request = json.dumps({"env": env, "stdin": stdin.decode("utf-8", "surrogateescape")}).encode()
        try:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
            answer = json.loads(b"".join(chunks))
            return int(answer["code"]), str(answer["stdout"]), str(answer.get("stderr", ""))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # The server took the request and then failed: the work may be half done, so do not redo it here;
            # tell the runtime to retry (ADD and DEL are idempotent).
            error = {"cniVersion": "1.1.0", "code": 11, "msg": f"podnet CNI server failed: {exc}"}
            return 1, json.dumps(error) + "\n", f"podnet-cni: server at {path} failed: {exc}\n"
    finally:
        sock.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["serve"]:
        from cni.server import serve_main

        return serve_main(args[1:])
    try:
        stdin = sys.stdin.buffer.read()
    except OSError as exc:
        print(json.dumps({"cniVersion": "1.1.0", "code": 5, "msg": f"reading stdin: {exc}"}))
        return 1
    env = {k: v for k, v in os.environ.items() if k.startswith(("CNI_", "PODNET_"))}
    answer = forward(socket_path(env, stdin), env, stdin)
    if answer is None:
        from cni.plugin import run

        outcome = run(env, stdin)
        answer = (outcome.code, outcome.stdout, outcome.stderr)
    code, out, err = answer
    sys.stdout.write(out)
    sys.stderr.write(err)
    return code


if __name__ == "__main__":
    sys.exit(main())
