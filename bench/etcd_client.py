"""Benchmark: etcd v3 client choices against a real etcd (started here on loopback).

    .venv/bin/python bench/etcd_client.py [--n 2000]

Measures put/s, get/s and a 2 000-key get-prefix for podnet's client (the etcd v3 stubs of etcd-sdk-python), and,
when the package is installed (`pip install etcd3==0.12.0`), for etcd3 0.12.0, which only imports with the
pure-Python protobuf (PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python). Each client runs in its own process, since
that variable must be set before protobuf is first imported. Prints a table and appends it to
bench/results/etcd_client.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testbed.etcd_server import EtcdServer

CHILD = r"""
import json, os, sys, time
which, endpoint, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
host, port = endpoint.split(":")
if which == "etcd3":
    import etcd3
    c = etcd3.client(host=host, port=int(port))
    put = lambda k, v: c.put(k, v)
    get = lambda k: c.get(k)
    prefix = lambda p: list(c.get_prefix(p))
else:
    from datastore.etcd import EtcdClient
    c = EtcdClient([endpoint])
    put = lambda k, v: c.put(k, v)
    get = lambda k: c.get(k)
    prefix = lambda p: c.get_prefix(p)[0]
root = f"/bench/{which}/"
value = b"x" * 200
t = time.perf_counter()
for i in range(n):
    put(f"{root}{i:06d}", value)
put_s = n / (time.perf_counter() - t)
t = time.perf_counter()
for i in range(n):
    get(f"{root}{i:06d}")
get_s = n / (time.perf_counter() - t)
t = time.perf_counter()
for _ in range(10):
    rows = prefix(root)
prefix_ms = (time.perf_counter() - t) / 10 * 1000
print(json.dumps({"client": which, "put_per_s": put_s, "get_per_s": get_s, "prefix_ms": prefix_ms, "keys": len(rows)}))
"""


def run(which: str, endpoint: str, n: int) -> dict[str, float] | None:
    env = dict(os.environ)
    if which == "etcd3":
        env["PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"] = "python"
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, which, endpoint, str(n)],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        check=False,
    )
    if proc.returncode != 0:
        print(f"{which}: not measured ({proc.stderr.strip().splitlines()[-1] if proc.stderr else 'failed'})")
        return None
    result: dict[str, float] = json.loads(proc.stdout)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    args = ap.parse_args()
    server = EtcdServer().start()
    try:
        rows = [r for r in (run(w, server.endpoint, args.n) for w in ("podnet", "etcd3")) if r]
    finally:
        server.stop()
    lines = [
        f"### etcd client, {time.strftime('%Y-%m-%d %H:%M')} ({args.n} keys of 200 B, one etcd 3.4 on loopback)",
        "",
        "| client | put/s | get/s | get-prefix of all keys |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['client']} | {r['put_per_s']:.0f} | {r['get_per_s']:.0f} | {r['prefix_ms']:.1f} ms |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).resolve().parent / "results" / "etcd_client.md"
    with out.open("a") as fh:
        fh.write(text + "\n")


if __name__ == "__main__":
    main()
