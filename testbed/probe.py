"""TCP/UDP probes, run inside a namespace with ``ip netns exec``: stdlib only, so they start fast.

python -m testbed.probe serve tcp|udp HOST PORT        prints "ready", answers until killed
python -m testbed.probe serve-many tcp/PORT|udp/PORT ...  one process answering on every port; prints "ready"
python -m testbed.probe connect tcp|udp HOST PORT TIMEOUT   exit 0 if answered, 1 if not
python -m testbed.probe sweep tcp|udp PORT TIMEOUT IP ...  tries every IP at once; prints one 1 (answered) or 0 each
python -m testbed.probe count PORT                     prints "ready", then one line per UDP datagram received
python -m testbed.probe stream HOST PORT INTERVAL      sends numbered UDP datagrams, each from a new socket
                                                       (a new flow, so every one meets the policy), until killed
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ANSWER = b"podnet-probe-ok"


def _serve_tcp(host: str, port: int) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(128)
    print("ready", flush=True)

    def answer(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.sendall(ANSWER)

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=answer, args=(conn,), daemon=True).start()


def _serve_udp(host: str, port: int) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind((host, port))
    print("ready", flush=True)
    while True:
        _, peer = srv.recvfrom(2048)
        srv.sendto(ANSWER, peer)


def _connect(proto: str, host: str, port: int, timeout: float) -> bool:
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:
        s.settimeout(timeout)
        try:
            if proto == "tcp":
                s.connect((host, port))
            else:
                s.sendto(b"ping", (host, port))
            data = s.recv(64)
        except OSError:
            return False
        return data == ANSWER


def _serve_many(specs: list[str]) -> None:
    """Every ``proto/port`` from one process (a pod can then listen on every port a test uses)."""
    sel = selectors.DefaultSelector()
    for spec in specs:
        proto, port = spec.split("/")
        kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
        s = socket.socket(socket.AF_INET, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", int(port)))
        if kind == socket.SOCK_STREAM:
            s.listen(128)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, kind)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            if not isinstance(sock, socket.socket):
                continue
            with contextlib.suppress(OSError):
                if key.data == socket.SOCK_STREAM:
                    conn, _ = sock.accept()
                    with conn:
                        conn.sendall(ANSWER)
                else:
                    _, peer = sock.recvfrom(2048)
                    sock.sendto(ANSWER, peer)


def _sweep(proto: str, port: int, timeout: float, hosts: list[str]) -> str:
    with ThreadPoolExecutor(max(1, len(hosts))) as pool:
        got = list(pool.map(lambda h: _connect(proto, h, port, timeout), hosts))
    return "".join("1" if g else "0" for g in got)


def _count(port: int) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("0.0.0.0", port))
    print("ready", flush=True)
    while True:
        data, peer = srv.recvfrom(2048)
        print(f"{peer[0]} {data.decode(errors='replace')}", flush=True)


def _stream(host: str, port: int, interval: float) -> None:
    n = 0
    while True:
        n += 1
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, contextlib.suppress(OSError):
            s.sendto(str(n).encode(), (host, port))
        time.sleep(interval)


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "count":
        _count(int(argv[1]))
        return 0
    if len(argv) == 4 and argv[0] == "stream":
        _stream(argv[1], int(argv[2]), float(argv[3]))
        return 0
    if len(argv) >= 2 and argv[0] == "serve-many":
        _serve_many(argv[1:])
        return 0
    if len(argv) >= 4 and argv[0] == "sweep" and argv[1] in ("tcp", "udp"):
        print(_sweep(argv[1], int(argv[2]), float(argv[3]), argv[4:]), flush=True)
        return 0
    if len(argv) >= 4 and argv[0] == "serve" and argv[1] in ("tcp", "udp"):
        (_serve_tcp if argv[1] == "tcp" else _serve_udp)(argv[2], int(argv[3]))
        return 0
    if len(argv) >= 5 and argv[0] == "connect" and argv[1] in ("tcp", "udp"):
        return 0 if _connect(argv[1], argv[2], int(argv[3]), float(argv[4])) else 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
