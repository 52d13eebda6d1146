"""The protocol between the CNI thin clients and the node's CNI server, on a unix stream socket, one call per
connection (bytes; env values cannot contain NUL):

    request:  MAGIC + "KEY=VALUE\\0" for every CNI_* / PODNET_* variable + "\\0" + stdin, then the client shuts
              down its write side
    answer:   "<exit code> <stdout length>\\n" + stdout + stderr

This module is the server's side. The clients are ``cni/main.py`` (Python; ``forward``, ``encode_request``,
``decode_answer``: it must also run standalone, without this package, so it repeats ``MAGIC`` and
``DEFAULT_SOCKET``, and a unit test checks the two sides agree) and ``cni/client/podnet-cni.c`` (compiled).
"""

from __future__ import annotations

DEFAULT_SOCKET = "/run/podnet/cni.sock"
MAGIC = b"PODNETCNI1\n"
MAX_REQUEST = 1 << 20  # the server reads at most this much (configs are small)


def parse_request(raw: bytes) -> tuple[dict[str, str], bytes] | None:
    """The client's env and stdin, or None if malformed."""
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


def encode_answer(code: int, stdout: bytes, stderr: bytes) -> bytes:
    return b"%d %d\n" % (code, len(stdout)) + stdout + stderr


STATS_COMMAND = "podnet-stats"  # not a CNI command: the server answers its call counts and latencies (JSON)


def encode_request(env: dict[str, str], stdin: bytes = b"") -> bytes:
    """What a client sends (``parse_request`` reads it): the magic line, ``KEY=VALUE`` NUL-terminated, a NUL, stdin."""
    return MAGIC + b"".join(f"{key}={value}".encode() + b"\0" for key, value in env.items()) + b"\0" + stdin


def parse_answer(raw: bytes) -> tuple[int, bytes, bytes] | None:
    """(exit code, stdout, stderr) from what the server wrote (``encode_answer``), or None if malformed."""
    head, sep, rest = raw.partition(b"\n")
    fields = head.split()
    if not sep or len(fields) != 2 or not all(f.isdigit() for f in fields):
        return None
    code, length = int(fields[0]), int(fields[1])
    if len(rest) < length:
        return None
    return code, rest[:length], rest[length:]
