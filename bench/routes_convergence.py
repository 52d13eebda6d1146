"""Benchmark: end-to-end route convergence through the whole agent path, on network namespaces (needs root; takes
the netns suite's lock).

    .venv/bin/python bench/routes_convergence.py [--rounds 5] [--topology mesh10|rr30|mesh3]

One ``agent.node_runner`` process per node (etcd watch → ``bgp.speaker`` / ExaBGP → peers' RIBs → their runners →
pyroute2). A new block affinity is written to etcd for one (non-reflector) node; measured is the time until every
other node's kernel has the route (``ip monitor route`` in each node namespace), and, after the block is deleted,
until it is gone everywhere. bench/bgp_convergence.py measures the BGP part alone (to the receivers' RIBs) next to
BIRD; the difference is what the datastore watch, the runners' passes and the kernel writes add. Also: resident
memory and CPU time of each node's runner process (the agent side, ExaBGP not included). Prints a table and
appends it to bench/results/routes.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datastore import keys as k
from datastore import model as m
from datastore.etcd import EtcdClient
from datastore.store import Store
from testbed.etcd_server import EtcdServer
from testbed.netns import NetnsBed, Node

LOCK = "/run/lock/podnet-netns.lock"
RESULTS = Path(__file__).resolve().parent / "results" / "routes.md"
TOPOLOGIES = {"mesh3": (3, 0), "mesh10": (10, 0), "rr30": (30, 2)}  # nodes, reflectors


class Monitor:
    """``ip monitor route`` in one node namespace: when each prefix was first added and deleted."""

    def __init__(self, node: Node) -> None:
        self.proc = subprocess.Popen(
            ["ip", "-n", node.ns.name, "monitor", "route"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        self.added: dict[str, float] = {}
        self.deleted: dict[str, float] = {}
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            now = time.monotonic()
            words = line.split()
            if not words:
                continue
            if words[0] == "Deleted" and len(words) > 1:
                self.deleted.setdefault(words[1], now)
            elif "proto" in words and "80" in words:
                self.added.setdefault(words[0], now)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def proc_stats(pid: int) -> tuple[float, float]:
    """(resident MiB, CPU seconds) of one process."""
    rss = 0.0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss, (int(fields[11]) + int(fields[12])) / ticks


def wait(pred: object, timeout: float, what: str) -> None:
    assert callable(pred)
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout}s: {what}")
        time.sleep(0.05)


def run(topology: str, rounds: int, encapsulation: str) -> dict[str, object]:
    n_nodes, n_rr = TOPOLOGIES[topology]
    server = EtcdServer().start()
    etcd = EtcdClient([server.endpoint])
    bed = NetnsBed()
    work = Path(tempfile.mkdtemp(prefix="podnet-conv-"))
    runners: list[subprocess.Popen[bytes]] = []
    monitors: dict[str, Monitor] = {}
    try:
        store = Store(etcd)
        store.put(m.ClusterConfig(node_mesh=n_rr == 0, encapsulation=encapsulation))
        store.put(m.IPPool("10.244.0.0/16", encapsulation=encapsulation))
        ul = bed.underlay()
        nodes: dict[str, Node] = {}
        for i in range(1, n_nodes + 1):
            name = f"n{i}"
            nodes[name] = bed.node(name, ul, 10 + i)
            rr = "1.0.0.1" if i <= n_rr else None
            store.put(m.Node(name, nodes[name].ip, rr_cluster_id=rr, vxlan_address=f"10.244.{i}.1"))
            store.put(m.Block(f"10.244.{i}.0/26", affinity=f"node:{name}"))
        for name, node in nodes.items():
            log = open(work / f"{name}.log", "wb")  # noqa: SIM115 - the child writes it until it exits
            runners.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "agent.node_runner",
                        "--node",
                        name,
                        "--netns",
                        node.ns.name,
                        "--etcd-endpoints",
                        server.endpoint,
                        "--workdir",
                        str(work / name),
                        "--log-level",
                        "WARNING",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            log.close()

        def converged() -> bool:
            for node in nodes.values():
                out = node.ns.ip("route", "show", "proto", "80")
                if out.count("\n") < n_nodes:  # the other nodes' blocks + our blackhole
                    return False
            return True

        t = time.monotonic()
        wait(converged, 300, "initial convergence")
        startup = time.monotonic() - t
        monitors = {name: Monitor(node) for name, node in nodes.items()}
        time.sleep(1)
        origin = f"n{n_nodes}"  # never a reflector
        adds: list[float] = []
        dels: list[float] = []
        for r in range(rounds):
            cidr = f"10.244.{200 + r}.0/26"
            others = [mon for name, mon in monitors.items() if name != origin]
            t0 = time.monotonic()
            store.put(m.Block(cidr, affinity=f"node:{origin}"))
            wait(lambda c=cidr, o=others: all(c in mon.added for mon in o), 60, f"{cidr} everywhere")
            adds.append((max(mon.added[cidr] for mon in others) - t0) * 1000)
            time.sleep(0.5)
            t0 = time.monotonic()
            store.delete(k.BlockKey(cidr))
            wait(lambda c=cidr, o=others: all(c in mon.deleted for mon in o), 60, f"{cidr} gone everywhere")
            dels.append((max(mon.deleted[cidr] for mon in others) - t0) * 1000)
            time.sleep(0.5)
        stats = [proc_stats(p.pid) for p in runners if p.poll() is None]
        return {
            "topology": f"{n_nodes} nodes, " + (f"{n_rr} reflectors" if n_rr else "full mesh"),
            "encapsulation": encapsulation,
            "startup_s": startup,
            "add_median": statistics.median(adds),
            "add_max": max(adds),
            "del_median": statistics.median(dels),
            "del_max": max(dels),
            "rss": statistics.mean(s[0] for s in stats),
            "cpu": statistics.mean(s[1] for s in stats),
        }
    finally:
        for mon in monitors.values():
            mon.close()
        for p in runners:
            if p.poll() is None:
                p.terminate()
        for p in runners:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
                p.wait()
        bed.close()
        etcd.close()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--topology", action="append", choices=sorted(TOPOLOGIES))
    ap.add_argument("--encapsulation", default="vxlan", choices=("vxlan", "none"))
    args = ap.parse_args()
    topologies = args.topology or ["mesh10", "rr30"]
    os.makedirs(os.path.dirname(LOCK), exist_ok=True)
    rows = []
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # never beside a netns test suite
        for topology in topologies:
            r = run(topology, args.rounds, args.encapsulation)
            rows.append(
                f"| {r['topology']} | {r['encapsulation']} | {r['add_median']:.0f} | {r['add_max']:.0f} | "
                f"{r['del_median']:.0f} | {r['del_max']:.0f} | {r['startup_s']:.1f} | {r['rss']:.0f} | "
                f"{r['cpu']:.1f} |"
            )
            print(rows[-1], flush=True)
    load = os.getloadavg()[0]
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join(
        [
            f"\n## {stamp}: `bench/routes_convergence.py --rounds {args.rounds}` ({os.cpu_count()} CPUs, "
            f"load average {load:.1f} at the end)\n",
            "New block affinity in etcd → route in every other node's kernel (and block deleted → route gone), "
            "through the node runners.\n",
            "| topology | encapsulation | add: median (ms) | add: max (ms) | delete: median (ms) | delete: max (ms) "
            "| start to converged (s) | runner RSS per node (MiB) | runner CPU per node, whole run (s) |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    with RESULTS.open("a") as fh:
        fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
