"""The compiled thin client (cni/client/podnet-cni.c) speaks exactly the protocol the server parses: checked against
a scripted server on a unix socket, with the server's own request parser. No root, no etcd. The binary is built by
scripts/bootstrap; a missing binary fails these tests rather than skipping them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cni.wire import parse_request

ROOT = Path(__file__).resolve().parents[2]
CLIENT = os.environ.get("PODNET_CNI_CLIENT") or str(ROOT / ".venv" / "bin" / "podnet-cni-client")
BASE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


@pytest.fixture(scope="module")
def client() -> str:
    assert os.access(CLIENT, os.X_OK), f"{CLIENT} is missing: scripts/bootstrap builds it (gcc)"
    return CLIENT


@dataclass
class Scripted:
    """A one-connection-at-a-time server: records each raw request and answers with ``reply(raw)`` (None: close
    without answering, like a server that died mid-request)."""

    path: str
    reply: Callable[[bytes], bytes | None]
    requests: list[bytes] = field(default_factory=list)

    def serve(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with conn:
                chunks = []
                while chunk := conn.recv(65536):
                    chunks.append(chunk)
                raw = b"".join(chunks)
                self.requests.append(raw)
                answer = self.reply(raw)
                if answer is not None:
                    conn.sendall(answer)


@pytest.fixture
def scripted(tmp_path: Path) -> Iterator[Callable[[Callable[[bytes], bytes | None]], Scripted]]:
    socks: list[socket.socket] = []
    threads: list[threading.Thread] = []

    def start(reply: Callable[[bytes], bytes | None]) -> Scripted:
        path = str(tmp_path / f"s{len(socks)}.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen(16)
        srv = Scripted(path, reply)
        t = threading.Thread(target=srv.serve, args=(sock,), daemon=True)
        t.start()
        socks.append(sock)
        threads.append(t)
        return srv

    try:
        yield start
    finally:
        for s in socks:
            s.shutdown(socket.SHUT_RDWR)
            s.close()
        for t in threads:
            t.join(timeout=5)


def run(client: str, env: dict[str, str], stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([client], input=stdin, env={**BASE_ENV, **env}, capture_output=True, timeout=30, check=False)


def answer(code: int, out: bytes, err: bytes = b"") -> bytes:
    return b"%d %d\n" % (code, len(out)) + out + err


def test_forwards_exactly_the_cni_and_podnet_env_and_stdin(client: str, scripted: Callable[..., Scripted]) -> None:
    srv = scripted(lambda raw: answer(0, b'{"cniVersion": "1.0.0"}\n', b"a warning\n"))
    stdin = b'{"cniVersion": "1.0.0", "name": "x"}\x00\xff binary tail'
    env = {
        "PODNET_CNI_SOCKET": srv.path,
        "CNI_COMMAND": "ADD",
        "CNI_ARGS": "K8S_POD_NAMESPACE=a;K8S_POD_NAME=b=c",
        "CNI_EMPTY": "",
        "PODNET_NODE_NAME": "n1",
        "HOME": "/root",
        "XCNI_NOT": "1",
    }
    proc = run(client, env, stdin)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b'{"cniVersion": "1.0.0"}\n'
    assert proc.stderr == b"a warning\n"
    parsed = parse_request(srv.requests[0])
    assert parsed is not None
    got_env, got_stdin = parsed
    assert got_stdin == stdin
    assert got_env == {k: v for k, v in env.items() if k.startswith(("CNI_", "PODNET_"))}


def test_exit_code_and_error_answer_pass_through(client: str, scripted: Callable[..., Scripted]) -> None:
    err = b'{"cniVersion": "1.0.0", "code": 6, "msg": "network configuration on stdin is not JSON"}\n'
    srv = scripted(lambda raw: answer(1, err, b"podnet-cni: bad\n"))
    proc = run(client, {"PODNET_CNI_SOCKET": srv.path, "CNI_COMMAND": "ADD"}, b"garbage")
    assert proc.returncode == 1 and proc.stdout == err and proc.stderr == b"podnet-cni: bad\n"


def test_large_stdin_and_answer(client: str, scripted: Callable[..., Scripted]) -> None:
    big = json.dumps({"cniVersion": "1.0.0", "pad": "x" * 300_000}).encode()
    srv = scripted(lambda raw: answer(0, raw[-200_000:]))
    proc = run(client, {"PODNET_CNI_SOCKET": srv.path}, big)
    assert proc.returncode == 0 and proc.stdout == big[-200_000:]
    parsed = parse_request(srv.requests[0])
    assert parsed is not None and parsed[1] == big


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(lambda raw: None, id="closed-without-answer"),
        pytest.param(lambda raw: b"0 100\nshort", id="truncated"),
        pytest.param(lambda raw: b"zero 3\nabc", id="malformed-header"),
    ],
)
def test_a_server_that_fails_after_accepting_gets_try_again_later(
    client: str, scripted: Callable[..., Scripted], reply: Callable[[bytes], bytes | None], tmp_path: Path
) -> None:
    """The request reached the server, so the work may be half done: no fallback (it would redo it), code 11."""
    srv = scripted(reply)
    marker = tmp_path / "fallback-ran"
    fallback = tmp_path / "fallback.sh"
    fallback.write_text(f"#!/bin/sh\ntouch {marker}\n")
    fallback.chmod(0o755)
    proc = run(client, {"PODNET_CNI_SOCKET": srv.path, "PODNET_CNI_FALLBACK": str(fallback)}, b"{}")
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert out["code"] == 11 and srv.path in out["msg"] and out["cniVersion"]
    assert b"podnet-cni:" in proc.stderr
    assert not marker.exists()


def test_no_server_runs_the_fallback_with_the_same_stdin(client: str, tmp_path: Path) -> None:
    """Nobody listens: exec $PODNET_CNI_FALLBACK with stdin unchanged (any size) and the socket pointed away."""
    seen = tmp_path / "seen"
    fallback = tmp_path / "fallback.sh"
    fallback.write_text(
        f"#!/bin/sh\ncat > {seen}.stdin\n"
        f'echo "$PODNET_CNI_SOCKET $CNI_COMMAND" > {seen}.env\n'
        f"grep SigIgn /proc/$$/status > {seen}.sig\n"
        "echo out\nexit 3\n"
    )
    fallback.chmod(0o755)
    stdin = b'{"cniVersion": "1.0.0"}' + b" " * 200_000
    env = {
        "PODNET_CNI_SOCKET": str(tmp_path / "nobody.sock"),
        "PODNET_CNI_FALLBACK": str(fallback),
        "CNI_COMMAND": "DEL",
    }
    proc = run(client, env, stdin)
    assert proc.returncode == 3 and proc.stdout == b"out\n"
    assert Path(f"{seen}.stdin").read_bytes() == stdin
    assert Path(f"{seen}.env").read_text() == "/nonexistent DEL\n"
    ignored = int(Path(f"{seen}.sig").read_text().split()[1], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1))  # the client's own SIGPIPE setting is not inherited


def test_no_server_and_no_fallback_is_a_spec_error(client: str, tmp_path: Path) -> None:
    env = {"PODNET_CNI_SOCKET": str(tmp_path / "nobody.sock"), "PODNET_CNI_FALLBACK": str(tmp_path / "missing")}
    proc = run(client, env, b"{}")
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert out["code"] == 50 and "missing" in out["msg"] and "nobody.sock" in out["msg"]


def test_an_over_long_socket_path_falls_back(client: str, tmp_path: Path) -> None:
    fallback = tmp_path / "fallback.sh"
    fallback.write_text("#!/bin/sh\necho fell back\n")
    fallback.chmod(0o755)
    env = {"PODNET_CNI_SOCKET": "/" + "x" * 200, "PODNET_CNI_FALLBACK": str(fallback)}
    proc = run(client, env, b"{}")
    assert proc.returncode == 0 and proc.stdout == b"fell back\n"
