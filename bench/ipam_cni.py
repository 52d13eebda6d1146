"""Benchmark: podnet-cni ADD latency and cluster-wide IPAM allocation rate, on a real etcd and real namespaces.

    sudo .venv/bin/python bench/ipam_cni.py [--pods 100] [--concurrency 10] [--alloc-per-proc 500]

1. Start-up cost of the plugin process: the thin client (stdlib only) vs importing the whole plugin (grpc, etcd).
2. CNI ADD of ``--pods`` pods on one node (a network namespace on a test-bed underlay) with ``--concurrency``
   ADDs in flight, through the node-local server (``podnet-cni serve``) with the compiled client
   (``.venv/bin/podnet-cni-client``, built by scripts/bootstrap), the lean Python client and the console script,
   and one-shot (no server): per-ADD latency p50/p99, CPU per ADD, the server's per-step times, and the wall time
   until every pod is networked (a /32 route per pod on the node is checked). Then DEL.
   ``--only-compiled`` runs only the first of those rounds and prints without recording.
3. Allocations per second across 4 nodes: one allocator process per node (and two per node), each calling
   ``Ipam.auto_assign`` in a loop, started together.

Prints a table and appends it to bench/results/ipam_cni.md. ``PODNET_BENCH_SERVER`` replaces the server's command
(e.g. a profiling wrapper around ``cni.server.serve_main``). Needs root (network namespaces); touches nothing
outside the namespaces it creates.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datastore.etcd import EtcdClient
from datastore.model import IPPool
from datastore.store import Store
from ipam.pools import add_pool
from testbed.etcd_server import EtcdServer
from testbed.netns import NetnsBed

ROOT = Path(__file__).resolve().parents[1]
LOCK = "/run/lock/podnet-netns.lock"
PLUGIN = str(Path(sys.executable).parent / "podnet-cni")
LEAN = [sys.executable, "-I", "-S", str(ROOT / "cni" / "main.py")]
# The server's command line; PODNET_BENCH_SERVER swaps in another (e.g. a profiling wrapper of cni.server).
SERVER = os.environ.get("PODNET_BENCH_SERVER", f"{PLUGIN} serve").split()
# The compiled thin client (cni/client/podnet-cni.c), built by scripts/bootstrap.
COMPILED = os.environ.get("PODNET_CNI_CLIENT") or str(ROOT / ".venv" / "bin" / "podnet-cni-client")

ALLOCATOR = r"""
import sys, time
from datastore.etcd import EtcdClient
from ipam.allocator import Ipam
endpoint, node, tag, n, start_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
ipam = Ipam(EtcdClient([endpoint]))
ipam.auto_assign(f"warm-{tag}", node)  # connect and claim a first block before the clock starts
while time.time() < start_at:
    time.sleep(0.001)
t = time.perf_counter()
for i in range(n):
    ipam.auto_assign(f"{tag}-{i}", node)
print(time.perf_counter() - t)
"""


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def startup_ms(module: str, runs: int = 10) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True, cwd=ROOT)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process (and its reaped children), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def startup_ms_cmd(cmd: list[str], runs: int = 10) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, check=False, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def cni_call(
    client: list[str], command: str, conf: dict[str, object], *, cid: str, netns: str, name: str, sock: str
) -> tuple[float, int, str]:
    env = {
        "PODNET_CNI_SOCKET": sock,
        "PODNET_CNI_FALLBACK": PLUGIN,
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": cid,
        "CNI_NETNS": netns,
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": f"K8S_POD_NAMESPACE=bench;K8S_POD_NAME={name}",
    }
    t = time.perf_counter()
    proc = subprocess.run(client, input=json.dumps(conf).encode(), env=env, capture_output=True, check=False)
    return time.perf_counter() - t, proc.returncode, proc.stdout.decode()


def add_round(
    bed: NetnsBed, server: EtcdServer, pods: int, concurrency: int, *, client: list[str], use_server: bool, tag: str
) -> dict[str, Any]:
    underlay = bed.underlay()
    node = bed.node(f"n{tag}", underlay, 11)
    sock = f"/run/podnet-bench-{os.getpid()}-{tag}.sock"
    conf = {
        "cniVersion": "1.0.0",
        "name": "podnet",
        "type": "podnet-cni",
        "etcdEndpoints": [server.endpoint],
        "nodeName": f"bench-{tag}",
        "hostNetns": f"/var/run/netns/{node.ns.name}",
    }
    sandboxes = [bed.netns(f"{tag}p{i}") for i in range(pods)]
    proc = None
    server_log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed below, after the server has exited
    if use_server:
        proc = subprocess.Popen([*SERVER, "--socket", sock], stdout=subprocess.PIPE, stderr=server_log, text=True)
        assert proc.stdout is not None and proc.stdout.readline().startswith("ready")
    try:

        def add(i: int) -> tuple[float, int, str]:
            return cni_call(
                client,
                "ADD",
                conf,
                cid=f"{tag}c{i}",
                netns=f"/var/run/netns/{sandboxes[i].name}",
                name=f"p{i}",
                sock=sock,
            )

        # CPU time is what the load of a shared machine does not distort: the clients' (our waited-for children)
        # and the server's own, per ADD.
        kids_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        srv_before = cpu_seconds(proc.pid) if proc is not None else 0.0
        assert server.proc is not None
        etcd_before = cpu_seconds(server.proc.pid)
        t = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(add, range(pods)))
        wall = time.perf_counter() - t
        kids_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        srv_cpu = (cpu_seconds(proc.pid) - srv_before) if proc is not None else float("nan")
        etcd_cpu = cpu_seconds(server.proc.pid) - etcd_before
        client_cpu = (kids_after.ru_utime + kids_after.ru_stime) - (kids_before.ru_utime + kids_before.ru_stime)
        failed = [out for _, code, out in results if code != 0]
        if failed:
            raise SystemExit(f"{len(failed)} ADDs failed, first: {failed[0]}")
        routes = [r for r in node.ns.ip("route", "show", "proto", "80").splitlines() if r.strip()]
        assert len(routes) == pods, f"expected {pods} pod routes, found {len(routes)}"
        lat = [x[0] * 1000 for x in results]

        def delete(i: int) -> tuple[float, int, str]:
            return cni_call(
                client,
                "DEL",
                conf,
                cid=f"{tag}c{i}",
                netns=f"/var/run/netns/{sandboxes[i].name}",
                name=f"p{i}",
                sock=sock,
            )

        t = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            dels = list(pool.map(delete, range(pods)))
        del_wall = time.perf_counter() - t
        assert all(code == 0 for _, code, _ in dels)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
    server_log.seek(0)
    # The server logs "ADD <id> -> 0 in 12.3 ms (parse 0.1, lock 2.0, ...)": its own share of each ADD, without the
    # client process, and the steps of that share.
    inside_by_cid: dict[str, float] = {}
    phases: dict[str, list[float]] = {}
    for cid, total, steps in re.findall(r"ADD (\S+) -> 0 in ([0-9.]+) ms \(([^)]*)\)", server_log.read()):
        inside_by_cid[cid] = float(total)
        for step in filter(None, steps.split(", ")):
            name, ms = step.rsplit(" ", 1)
            phases.setdefault(name, []).append(float(ms))
    server_log.close()
    inside = list(inside_by_cid.values())
    if inside:
        # Outside the server: the client process, connecting, the accept queue, the handler thread's start.
        phases["outside the server"] = [
            lat[i] - inside_by_cid[f"{tag}c{i}"] for i in range(pods) if f"{tag}c{i}" in inside_by_cid
        ]
    return {
        "phases": phases,
        "p50": statistics.median(lat),
        "p99": pct(lat, 99),
        "max": max(lat),
        "wall": wall,
        "del_p99": pct([x[0] * 1000 for x in dels], 99),
        "del_wall": del_wall,
        "srv_p50": statistics.median(inside) if inside else float("nan"),
        "srv_p99": pct(inside, 99) if inside else float("nan"),
        "client_cpu_ms": client_cpu / pods * 1000,
        "server_cpu_ms": srv_cpu / pods * 1000,
        "etcd_cpu_ms": etcd_cpu / pods * 1000,
    }


def alloc_rate(server: EtcdServer, nodes: int, per_node: int, n: int) -> float:
    start_at = time.time() + 3.0
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                ALLOCATOR,
                server.endpoint,
                f"node{i % nodes}",
                f"r{per_node}-{i}",
                str(n),
                str(start_at),
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for i in range(nodes * per_node)
    ]
    durations = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        if p.returncode != 0:
            raise SystemExit("allocator failed")
        durations.append(float(out.strip()))
    return nodes * per_node * n / max(durations)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pods", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--alloc-per-proc", type=int, default=500)
    parser.add_argument(
        "--only-compiled", action="store_true", help="only the compiled client's round; print, do not record"
    )
    args = parser.parse_args()
    if not os.access(COMPILED, os.X_OK):
        raise SystemExit(f"{COMPILED} is missing: run scripts/bootstrap (it builds the compiled client)")
    # The netns test suite's lock: a benchmark and a netns suite would skew each other's figures.
    lock = open(LOCK, "w")  # noqa: SIM115 - held for the whole run
    fcntl.flock(lock, fcntl.LOCK_EX)
    load_before = os.getloadavg()[0]
    thin = startup_ms("cni.main")
    full = startup_ms("cni.plugin")
    lean = startup_ms_cmd([sys.executable, "-I", "-S", "-c", "import _socket, os, sys"])
    server = EtcdServer().start()
    rows = []
    try:
        with EtcdClient([server.endpoint]) as client:
            add_pool(Store(client), IPPool("10.244.0.0/16"))
        rounds = [
            ("server, compiled client (`podnet-cni-client`)", [COMPILED], True),
            ("server, standalone lean client (`python3 -I -S cni/main.py`)", LEAN, True),
            ("server, console-script client (`podnet-cni`)", [PLUGIN], True),
            ("one-shot, no server (`podnet-cni`)", [PLUGIN], False),
        ]
        if args.only_compiled:
            rounds = rounds[:1]
        measured = []
        for i, (label, client, use_server) in enumerate(rounds):
            with NetnsBed() as bed:
                r = add_round(
                    bed, server, args.pods, args.concurrency, client=client, use_server=use_server, tag=f"r{i}"
                )
            measured.append((label, r))
        with EtcdClient([server.endpoint]) as client:
            client.delete_prefix("/podnet/v1/ipam/")
            add_pool(Store(client), IPPool("10.244.0.0/16"))
        rate1 = alloc_rate(server, 4, 1, args.alloc_per_proc) if not args.only_compiled else float("nan")
        rate2 = alloc_rate(server, 4, 2, args.alloc_per_proc) if not args.only_compiled else float("nan")
    finally:
        server.stop()
    for label, r in measured:
        rows.append(
            f"| {label} | {r['p50']:.0f} ms | {r['p99']:.0f} ms | {r['max']:.0f} ms | "
            f"{r['srv_p50']:.0f} / {r['srv_p99']:.0f} ms | "
            f"{r['client_cpu_ms']:.1f} / {r['server_cpu_ms']:.1f} / {r['etcd_cpu_ms']:.1f} ms | "
            f"{r['wall']:.2f} s | {r['del_p99']:.0f} ms | {r['del_wall']:.2f} s |"
        )
    phase_lines = []
    for label, r in measured:
        if r["phases"]:
            steps = ", ".join(
                f"{name} {statistics.median(v):.1f} / {pct(v, 99):.1f}" for name, v in r["phases"].items()
            )
            phase_lines += [f"- {label}: {steps}", ""]
    cpus = os.cpu_count()
    load_after = os.getloadavg()[0]
    text = "\n".join(
        [
            f"### IPAM and CNI, {time.strftime('%Y-%m-%d %H:%M')} ({cpus} CPUs, load average "
            f"{load_before:.1f} before / {load_after:.1f} after, etcd 3.4 on loopback, "
            f"{args.pods} pods on one node, {args.concurrency} concurrent)",
            "",
            f"Process start-up (median of 10): `python -c 'import cni.main'` {thin:.0f} ms, "
            f"`python -c 'import cni.plugin'` {full:.0f} ms, "
            f"`python -I -S` with the lean client's imports {lean:.0f} ms.",
            "",
            f"| CNI mode | ADD p50 | ADD p99 | ADD max | in server p50 / p99 | CPU per ADD client / server / etcd "
            f"| {args.pods} pods networked | DEL p99 | {args.pods} DELs |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            "Where an ADD's time goes (ms, p50 / p99 over the ADDs; `ipam` includes the wait for the node's "
            "group commit, `outside the server` is the client's latency minus the server's: process start, "
            "connect, accept queue):",
            "",
            *phase_lines,
            f"Allocations/s across 4 nodes ({args.alloc_per_proc} per process): 1 process per node "
            f"{rate1:.0f}/s, 2 processes per node {rate2:.0f}/s.",
            "",
        ]
    )
    print(text)
    if args.only_compiled:
        return  # a quick look, not a recorded run
    results = ROOT / "bench" / "results" / "ipam_cni.md"
    with results.open("a") as fh:
        fh.write(text + "\n")


if __name__ == "__main__":
    main()
