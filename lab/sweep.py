"""Run inside a pod's namespace (stdlib only, so it starts fast):

sweep.py serve PORT/PROTO ...                  answer TCP connections and UDP datagrams; prints "ready"
sweep.py probe tcp|udp PORT TIMEOUT IP ...     try every IP at once; prints one 1 (answered) or 0 per IP
"""

from __future__ import annotations

import selectors
import socket
import sys
from concurrent.futures import ThreadPoolExecutor

ANSWER = b"podnet-lab-ok"


def serve(specs: list[str]) -> None:
    sel = selectors.DefaultSelector()
    for spec in specs:
        port, proto = spec.split("/")
        kind = socket.SOCK_STREAM if proto.upper() == "TCP" else socket.SOCK_DGRAM
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
            try:
                if key.data == socket.SOCK_STREAM:
                    conn, _ = sock.accept()
                    conn.sendall(ANSWER)
                    conn.close()
                else:
                    _, peer = sock.recvfrom(2048)
                    sock.sendto(ANSWER, peer)
            except OSError:
                pass


def reach(proto: str, ip: str, port: int, timeout: float) -> bool:
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:
        s.settimeout(timeout)
        try:
            if kind == socket.SOCK_STREAM:
                s.connect((ip, port))
            else:
                s.sendto(b"ping", (ip, port))
            return s.recv(64) == ANSWER
        except OSError:
            return False


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "serve":
        serve(argv[1:])
        return 0
    if len(argv) >= 4 and argv[0] == "probe":
        proto, port, timeout, ips = argv[1], int(argv[2]), float(argv[3]), argv[4:]
        with ThreadPoolExecutor(max(1, len(ips))) as pool:
            got = list(pool.map(lambda ip: reach(proto, ip, port, timeout), ips))
        print("".join("1" if g else "0" for g in got), flush=True)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
