"""Entry point of `podnet-cni`: a thin client that hands the request to the node's CNI server, or runs it itself.

The container runtime starts a fresh process per call, and process start-up is most of an ADD's cost: importing
grpc and the etcd stubs takes ~0.1-0.3 s here, and even ``json`` + ``socket`` add ~12 ms to a bare interpreter's
~7 ms. So this module imports only ``_socket``, ``os`` and ``sys``: it forwards env + stdin over a unix socket to
``podnet-cni serve`` (long-running; etcd connections and block cache warm) and prints its answer. It is also a
standalone script: copied to the CNI bin directory with the shebang ``#!/usr/bin/python3 -I -S`` it starts in
~7 ms. When no server listens, it runs the plugin in-process (slower, same result) or, when standalone, executes
``$PODNET_CNI_FALLBACK`` (default ``podnet-cni``, the installed console script) with the same stdin.

The protocol is described in ``cni.wire`` (the server's side); this module is the client's side and repeats the
two constants it shares (it must also run without the package): a unit test checks the two sides agree.
``cni/client/podnet-cni.c`` is the same client compiled (~1 ms of CPU per call instead of ~10): what a node
installs. ``podnet-cni serve`` runs the server (``cni.serve``).
"""

from __future__ import annotations

import _socket
import os
import sys

DEFAULT_SOCKET = "/run/podnet/cni.sock"  # the same as cni.wire's: see above
MAGIC = b"PODNETCNI1\n"
ANSWER_TIMEOUT = 120.0  # the runtime's own timeout is usually longer
ENV_PREFIXES = ("CNI_", "PODNET_")


def encode_request(env: dict[str, str], stdin: bytes) -> bytes:
    block = b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items())
    return MAGIC + block + b"\0" + stdin


def decode_answer(raw: bytes) -> tuple[int, bytes, bytes]:
    head, _, rest = raw.partition(b"\n")
    code, length = (int(x) for x in head.split())
    return code, rest[:length], rest[length:]


def _error(code: int, msg: str) -> bytes:
    text = msg.replace("\\", "\\\\").replace('"', '\\"')
    return b'{"cniVersion": "1.1.0", "code": %d, "msg": "%s"}\n' % (code, text.encode())


def forward(path: str, env: dict[str, str], stdin: bytes) -> tuple[int, bytes, bytes] | None:
    """Send the request to the server. None if no server accepts the connection."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        try:
            # Blocking: a unix-socket connect fails at once when nobody listens, and waits (rather than failing
            # with EAGAIN) while a burst of ADDs fills the server's accept queue.
            sock.connect(path)
        except OSError:
            return None
        sock.settimeout(ANSWER_TIMEOUT)
        try:
            sock.sendall(encode_request(env, stdin))
            sock.shutdown(_socket.SHUT_WR)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
            return decode_answer(b"".join(chunks))
        except (OSError, ValueError) as exc:
            # The server took the request and failed: the work may be half done, so do not redo it here; ask the
            # runtime to retry (ADD and DEL are idempotent).
            msg = f"podnet CNI server at {path} failed: {exc}"
            return 1, _error(11, msg), f"podnet-cni: {msg}\n".encode()
    finally:
        sock.close()


def _fallback(env: dict[str, str], stdin: bytes) -> tuple[int, bytes, bytes]:
    try:
        from cni.plugin import run
    except ImportError:  # a standalone copy without the package: hand over to the installed plugin
        target = os.environ.get("PODNET_CNI_FALLBACK", "podnet-cni")
        read_end, write_end = os.pipe()
        os.write(write_end, stdin)  # configs are small: they fit in the pipe buffer
        os.close(write_end)
        os.dup2(read_end, 0)
        os.environ["PODNET_CNI_SOCKET"] = "/nonexistent"  # the server is not there: do not loop back here
        try:
            os.execvp(target, [target])
        except OSError as exc:
            msg = f"no CNI server at {env.get('PODNET_CNI_SOCKET') or DEFAULT_SOCKET} and cannot run {target}: {exc}"
            return 1, _error(50, msg), f"podnet-cni: {msg}\n".encode()
    outcome = run(env, stdin)
    return outcome.code, outcome.stdout.encode(), outcome.stderr.encode()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["serve"]:
        from cni.serve import serve_main

        return serve_main(args[1:])
    try:
        stdin = sys.stdin.buffer.read()
    except OSError as exc:
        sys.stdout.buffer.write(_error(5, f"reading stdin: {exc}"))
        return 1
    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}
    answer = forward(env.get("PODNET_CNI_SOCKET") or DEFAULT_SOCKET, env, stdin)
    code, out, err = answer if answer is not None else _fallback(env, stdin)
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
    sys.stderr.buffer.write(err)
    return code


if __name__ == "__main__":
    sys.exit(main())
