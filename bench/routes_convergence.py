"""Benchmark: end-to-end route convergence through the whole agent path, next to BIRD 2 on the same topology in
the same run, on network namespaces (needs root; takes the netns suite's lock).

    .venv/bin/python bench/routes_convergence.py [--rounds 5] [--topology mesh10|rr30|mesh3|mesh2] [--trace]

podnet: one ``agent.router`` process per node (etcd watch → ``bgp.speaker`` / ExaBGP → peers' RIBs → their
runners → pyroute2). A new block affinity is written to etcd for one (non-reflector) node; measured is the time
until every other node's kernel has the route (``ip monitor route`` in each node namespace), and, after the block
is deleted, until it is gone everywhere.
BIRD: then, in the same namespaces, one BIRD 2 per node with the same sessions (full mesh, or the same two nodes
as reflectors); a route appears in the origin's kernel (BIRD's kernel protocol learns it) and is timed until every
other node's kernel has it (BIRD writes it there), and back after it is deleted.
Also: resident memory and CPU time per node of the runner, of ExaBGP plus its API bridge, and of BIRD; CPU per
node per route event (add + delete, over the measured rounds). ``--trace`` has every runner write per-hop
timestamps (``--trace`` of the runner) and prints where the time went. Prints tables and appends them to
bench/results/routes.md.
"""

from __future__ import annotations

import argparse
import contextlib
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bgp_convergence import Topology, bird_conf, models_for  # same directory: the BIRD setup both benches use

from datastore import keys as k
from datastore import model as m
from datastore.etcd import EtcdClient
from datastore.store import Store
from testbed.etcd_server import EtcdServer
from testbed.netns import NetnsBed, NodeNs

LOCK = "/run/lock/podnet-netns.lock"
RESULTS = Path(__file__).resolve().parent / "results" / "routes.md"
TOPOLOGIES = {"mesh2": (2, 0), "mesh3": (3, 0), "mesh10": (10, 0), "rr30": (30, 2)}  # nodes, reflectors


class Monitor:
    """``ip monitor route`` in one node namespace: when each prefix was first added and deleted (wall clock)."""

    def __init__(self, node: NodeNs) -> None:
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
            now = time.time()
            words = line.split()
            if not words:
                continue
            if words[0] == "Deleted" and len(words) > 1:
                self.deleted.setdefault(words[1], now)
            elif "/" in words[0]:
                self.added.setdefault(words[0], now)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_s(pid: int) -> float:
    """CPU seconds of a process's live threads, at nanosecond resolution (``/proc/*/stat`` counts 10 ms ticks:
    too coarse for a few milliseconds per event)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out.extend(int(c) for c in (task / "children").read_text().split())
    return out


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    todo = children(pid)
    while todo:
        p = todo.pop()
        found.append(p)
        with contextlib.suppress(FileNotFoundError):
            todo.extend(children(p))
    return found


def group_usage(groups: list[list[int]]) -> tuple[float, float]:
    """(mean resident MiB, mean CPU seconds) per group of processes (one group = one node's processes)."""
    rss, cpu = [], []
    for pids in groups:
        r = c = 0.0
        for p in pids:
            try:
                r += rss_mib(p)
                c += cpu_s(p)
            except (FileNotFoundError, ProcessLookupError):
                pass
        rss.append(r)
        cpu.append(c)
    return statistics.mean(rss), statistics.mean(cpu)


IDLE_WINDOW = 3.0


def event_cost(
    groups: dict[str, list[list[int]]], events: int, rounds: Callable[[], None]
) -> dict[str, tuple[float, ...]]:
    """Run ``rounds`` and return, per group (one list of processes per node): mean resident MiB, CPU seconds since
    start, CPU ms per route event beyond idle (idle rate measured over a quiet window first), idle CPU %."""
    t = time.monotonic()
    idle0 = {what: group_usage(g)[1] for what, g in groups.items()}
    time.sleep(IDLE_WINDOW)
    idle_rate = {what: (group_usage(g)[1] - idle0[what]) / (time.monotonic() - t) for what, g in groups.items()}
    t = time.monotonic()
    cpu0 = {what: group_usage(g)[1] for what, g in groups.items()}
    rounds()
    elapsed = time.monotonic() - t
    out = {}
    for what, g in groups.items():
        rss, cpu = group_usage(g)
        per_event = (cpu - cpu0[what] - idle_rate[what] * elapsed) * 1000 / events
        out[what] = (rss, cpu, per_event, 100 * idle_rate[what])
    return out


def wait(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout}s: {what}")
        time.sleep(0.05)


@dataclass
class Side:
    impl: str
    adds: list[float] = field(default_factory=list)  # ms
    dels: list[float] = field(default_factory=list)
    startup_s: float = 0.0
    # what -> (RSS MiB, CPU s for the run, CPU ms per event beyond idle, idle CPU %), per node
    usage: dict[str, tuple[float, ...]] = field(default_factory=dict)


@dataclass
class Round:
    cidr: str
    t0: float  # wall clock of the etcd write
    kernel: dict[str, float]  # node -> route in its kernel


def timed_rounds(
    *,
    rounds: int,
    prefix_of: Callable[[int], str],
    monitors: dict[str, Monitor],
    origin: str,
    add: Callable[[str], None],
    delete: Callable[[str], None],
    side: Side,
    log: list[Round] | None = None,
) -> None:
    others = [mon for name, mon in monitors.items() if name != origin]
    for r in range(rounds):
        cidr = prefix_of(r)
        t0 = time.time()
        add(cidr)
        wait(lambda c=cidr: all(c in mon.added for mon in others), 60, f"{cidr} everywhere")
        side.adds.append((max(mon.added[cidr] for mon in others) - t0) * 1000)
        if log is not None:
            log.append(Round(cidr, t0, {n: mon.added[cidr] for n, mon in monitors.items() if n != origin}))
        time.sleep(0.5)
        t0 = time.time()
        delete(cidr)
        wait(lambda c=cidr: all(c in mon.deleted for mon in others), 60, f"{cidr} gone everywhere")
        side.dels.append((max(mon.deleted[cidr] for mon in others) - t0) * 1000)
        time.sleep(0.5)


def run_podnet(
    *,
    reactor_speed: float | None = None,
    server: EtcdServer,
    nodes: dict[str, NodeNs],
    n_rr: int,
    rounds: int,
    encapsulation: str,
    work: Path,
    trace: bool,
) -> tuple[Side, list[Round]]:
    etcd = EtcdClient([server.endpoint])
    store = Store(etcd)
    runners: dict[str, subprocess.Popen[bytes]] = {}
    monitors: dict[str, Monitor] = {}
    side = Side("podnet (runner + ExaBGP)")
    log: list[Round] = []
    try:
        store.put(m.ClusterConfig(node_mesh=n_rr == 0, encapsulation=encapsulation))
        store.put(m.IPPool("10.244.0.0/16", encapsulation=encapsulation))
        for i, (name, node) in enumerate(nodes.items(), start=1):
            rr = "1.0.0.1" if i <= n_rr else None
            store.put(m.Node(name, node.ip, rr_cluster_id=rr, vxlan_address=f"10.244.{i}.1"))
            store.put(m.Block(f"10.244.{i}.0/26", affinity=f"node:{name}"))
        for name, node in nodes.items():
            cmd = [
                sys.executable,
                "-m",
                "agent.router",
                "--node-name",
                name,
                "--netns",
                node.ns.name,
                "--etcd-endpoints",
                server.endpoint,
                "--workdir",
                str(work / name),
                "--log-level",
                "WARNING",
            ]
            if trace:
                cmd += ["--trace", str(work / f"{name}.trace")]
            if reactor_speed is not None:
                cmd += ["--exabgp-reactor-speed", str(reactor_speed)]
            with open(work / f"{name}.log", "wb") as out:
                runners[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

        def converged() -> bool:
            for node in nodes.values():
                out = node.ns.ip("route", "show", "proto", "80")
                if out.count("\n") < len(nodes):  # the other nodes' blocks + our blackhole
                    return False
            return True

        t = time.monotonic()
        wait(converged, 300, "initial convergence")
        side.startup_s = time.monotonic() - t
        monitors = {name: Monitor(node) for name, node in nodes.items()}
        time.sleep(1)
        origin = f"n{len(nodes)}"  # never a reflector
        groups = {name: [p.pid, *descendants(p.pid)] for name, p in runners.items()}
        exabgp = [g[1:] for g in groups.values()]  # ExaBGP (ip netns exec execs it) and its bridge
        runner = [g[:1] for g in groups.values()]
        side.usage = event_cost(
            {"runner": runner, "ExaBGP + bridge": exabgp},
            2 * rounds,
            lambda: timed_rounds(
                rounds=rounds,
                prefix_of=lambda r: f"10.244.{200 + r}.0/26",
                monitors=monitors,
                origin=origin,
                add=lambda c: store.put(m.Block(c, affinity=f"node:{origin}")),
                delete=lambda c: store.delete(k.BlockKey(c)),
                side=side,
                log=log,
            ),
        )
        return side, log
    finally:
        for mon in monitors.values():
            mon.close()
        for p in runners.values():
            if p.poll() is None:
                p.terminate()
        for p in runners.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
                p.wait()
        etcd.close()


def run_bird(bed: NetnsBed, nodes: dict[str, NodeNs], n_rr: int, rounds: int, work: Path) -> Side:
    hosts = list(nodes.values())
    topo = Topology("", len(hosts), n_rr)
    models = models_for(hosts, n_rr)
    procs: dict[str, subprocess.Popen[str]] = {}
    ctl = {h.name: work / f"{h.name}.ctl" for h in hosts}
    monitors: dict[str, Monitor] = {}
    side = Side("BIRD 2")
    try:
        for h in hosts:
            conf = work / f"{h.name}.conf"
            conf.write_text(bird_conf(models[h.name], models, topo))
            procs[h.name] = h.ns.popen("bird", "-f", "-c", str(conf), "-s", str(ctl[h.name]))

        def all_up() -> bool:
            for h in hosts:
                out = h.ns.run("birdc", "-s", str(ctl[h.name]), "show", "protocols", check=False).stdout
                rows = [line for line in out.splitlines() if line.startswith("p")]
                if not rows or any("Established" not in line for line in rows):
                    return False
            return True

        t = time.monotonic()
        wait(all_up, 120, "BIRD sessions")
        side.startup_s = time.monotonic() - t
        monitors = {name: Monitor(node) for name, node in nodes.items()}
        time.sleep(1)
        origin = f"n{len(nodes)}"
        pids = [[p.pid] for p in procs.values()]
        side.usage = event_cost(
            {"BIRD": pids},
            2 * rounds,
            lambda: timed_rounds(
                rounds=rounds,
                prefix_of=lambda r: f"10.250.{r}.0/26",
                monitors=monitors,
                origin=origin,
                add=lambda c: nodes[origin].ns.ip("route", "add", "blackhole", c),
                delete=lambda c: nodes[origin].ns.ip("route", "del", "blackhole", c),
                side=side,
            ),
        )
        return side
    finally:
        for mon in monitors.values():
            mon.close()
        for p in procs.values():
            bed.stop_process(p)
            bed.processes.remove(p)


# ---- where the time goes (--trace) ----------------------------------------------------------------------------


def read_traces(work: Path) -> list[tuple[float, str, str, str]]:
    """(time, node, event, rest) from every runner's trace file."""
    out = []
    for path in work.glob("*.trace"):
        for line in path.read_text().splitlines():
            parts = line.split(" ", 4)
            if len(parts) >= 4:
                out.append((float(parts[0]), parts[1], parts[3], parts[4] if len(parts) > 4 else ""))
    out.sort()
    return out


HOPS = (
    ("origin: etcd watch event", "origin"),
    ("origin: pass starts", "origin"),
    ("origin: announce set", "origin"),
    ("origin: command sent to the bridge", "origin"),
    ("origin: command acked by ExaBGP", "origin"),
    ("origin: pass ends", "origin"),
    ("reflector: UPDATE received (bridge event)", "first"),
    ("reflector: reflect command sent", "first"),
    ("reflector: reflect command acked", "last"),
    ("receivers: UPDATE received (bridge event)", "first"),
    ("receivers: UPDATE received (bridge event)", "last"),
    ("receivers: runner pass starts", "last"),
    ("receivers: route written (pyroute2 returned)", "last"),
    ("receivers: route in kernel (ip monitor)", "last"),
)


def hop_times(
    rnd: Round, traces: list[tuple[float, str, str, str]], origin: str, reflectors: set[str]
) -> dict[tuple[str, str], float]:
    """Milliseconds after the etcd write at which each hop happened, in one round."""
    t0, cidr = rnd.t0, rnd.cidr
    ev = [t for t in traces if t[0] >= t0 and t[0] <= t0 + 30]

    def first(node: str, event: str, after: float, needs: str | None = None) -> float | None:
        for t, n, e, rest in ev:
            if n == node and e == event and t >= after and (needs is None or needs in rest.split()):
                return t
        return None

    out: dict[tuple[str, str], float] = {}

    def put(label: str, how: str, t: float | None) -> None:
        if t is not None:
            out[(label, how)] = (t - t0) * 1000

    w = first(origin, "datastore-change", t0)
    p = first(origin, "pass-start", w or t0)
    a = first(origin, "announce-set", t0, cidr)
    sent = first(origin, "cmd-sent", t0, cidr)
    ack = first(origin, "cmd-ack", t0, cidr)
    end = first(origin, "pass-end", p or t0)
    for label, t in zip(
        ("etcd watch event", "pass starts", "announce set", "command sent to the bridge", "command acked by ExaBGP"),
        (w, p, a, sent, ack),
        strict=True,
    ):
        put(f"origin: {label}", "origin", t)
    put("origin: pass ends", "origin", end)
    recv: dict[str, float] = {}
    for node in rnd.kernel:
        t = first(node, "update-recv", t0, cidr)
        if t is not None:
            recv[node] = t
    rr_recv = [recv[n] for n in reflectors if n in recv]
    if rr_recv:
        put("reflector: UPDATE received (bridge event)", "first", min(rr_recv))
        sends = [t for t in (first(n, "cmd-sent", t0, cidr) for n in reflectors) if t is not None]
        acks = [t for t in (first(n, "cmd-ack", t0, cidr) for n in reflectors) if t is not None]
        put("reflector: reflect command sent", "first", min(sends, default=None))
        put("reflector: reflect command acked", "last", max(acks, default=None))
    clients = [n for n in rnd.kernel if n not in reflectors]
    c_recv = [recv[n] for n in clients if n in recv]
    if c_recv:
        put("receivers: UPDATE received (bridge event)", "first", min(c_recv))
        put("receivers: UPDATE received (bridge event)", "last", max(c_recv))
    passes, writes = [], []
    for node, t in recv.items():
        ps = first(node, "pass-start", t)
        wr = first(node, "routes-written", t, cidr)
        if ps is not None:
            passes.append(ps)
        if wr is not None:
            writes.append(wr)
    put("receivers: runner pass starts", "last", max(passes, default=None))
    put("receivers: route written (pyroute2 returned)", "last", max(writes, default=None))
    put("receivers: route in kernel (ip monitor)", "last", max(rnd.kernel.values()))
    return out


def hop_table(log: list[Round], work: Path, n_nodes: int, n_rr: int) -> list[str]:
    traces = read_traces(work)
    origin = f"n{n_nodes}"
    reflectors = {f"n{i}" for i in range(1, n_rr + 1)}
    per_round = [hop_times(r, traces, origin, reflectors) for r in log]
    rows = ["| hop | which node | median ms after the etcd write | min | max |", "|---|---|---|---|---|"]
    for label, how in HOPS:
        vals = [h[(label, how)] for h in per_round if (label, how) in h]
        if vals:
            rows.append(f"| {label} | {how} | {statistics.median(vals):.1f} | {min(vals):.1f} | {max(vals):.1f} |")
    return rows


def run(
    topology: str, rounds: int, encapsulation: str, trace: bool, keep: bool, *, reactor_speed: float | None = None
) -> tuple[list[str], list[str]]:
    n_nodes, n_rr = TOPOLOGIES[topology]
    server = EtcdServer().start()
    bed = NetnsBed()
    work = Path(tempfile.mkdtemp(prefix="podnet-conv-"))
    try:
        ul = bed.underlay()
        nodes = {f"n{i}": bed.node(f"n{i}", ul, 10 + i) for i in range(1, n_nodes + 1)}
        podnet, log = run_podnet(
            reactor_speed=reactor_speed,
            server=server,
            nodes=nodes,
            n_rr=n_rr,
            rounds=rounds,
            encapsulation=encapsulation,
            work=work,
            trace=trace,
        )
        (work / "bird").mkdir()
        bird = run_bird(bed, nodes, n_rr, rounds, work / "bird")
        name = f"{n_nodes} nodes, " + (f"{n_rr} reflectors" if n_rr else "full mesh")
        rows = []
        for side in (podnet, bird):
            usage = "; ".join(
                f"{what} {rss:.0f} MiB, {cpu:.1f} s, {per:.1f} ms/event, idle {idle:.1f} %"
                for what, (rss, cpu, per, idle) in side.usage.items()
            )
            rows.append(
                f"| {name} | {side.impl} | {statistics.median(side.adds):.0f} | {max(side.adds):.0f} | "
                f"{statistics.median(side.dels):.0f} | {max(side.dels):.0f} | {side.startup_s:.1f} | {usage} |"
            )
            print(rows[-1], flush=True)
        ratio = statistics.median(podnet.adds) / statistics.median(bird.adds)
        rows.append(f"| {name} | podnet / BIRD (add, medians) | {ratio:.1f} x | | | | | |")
        print(rows[-1], flush=True)
        hops = [f"\nWhere the time goes, {name} (`--trace`, {rounds} rounds):\n", *hop_table(log, work, n_nodes, n_rr)]
        if trace:
            print("\n".join(hops), flush=True)
        return rows, hops if trace else []
    finally:
        bed.close()
        server.stop()
        if keep:
            print(f"runner logs and traces kept in {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--topology", action="append", choices=sorted(TOPOLOGIES))
    ap.add_argument("--encapsulation", default="vxlan", choices=("vxlan", "none"))
    ap.add_argument("--trace", action="store_true", help="per-hop timestamps from the runners (adds a little work)")
    ap.add_argument("--reactor-speed", type=float, help="the runners' --exabgp-reactor-speed (default: theirs)")
    ap.add_argument("--keep", action="store_true", help="keep the runners' logs and traces")
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to the results file")
    args = ap.parse_args()
    topologies = args.topology or ["mesh10", "rr30"]
    os.makedirs(os.path.dirname(LOCK), exist_ok=True)
    rows: list[str] = []
    hops: list[str] = []
    loads = []
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # never beside a netns test suite
        loads.append(os.getloadavg()[0])
        for topology in topologies:
            r, h = run(
                topology, args.rounds, args.encapsulation, args.trace, args.keep, reactor_speed=args.reactor_speed
            )
            rows += r
            hops += h
            loads.append(os.getloadavg()[0])
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    flags = f"--rounds {args.rounds}" + (" --trace" if args.trace else "")
    if args.reactor_speed is not None:
        flags += f" --reactor-speed {args.reactor_speed}"
    text = "\n".join(
        [
            f"\n## {stamp}: `bench/routes_convergence.py {flags}` ({os.cpu_count()} CPUs, 1-minute load average "
            + " / ".join(f"{x:.1f}" for x in loads)
            + " at start / after each topology)\n",
            "podnet: new block affinity in etcd → route in every other node's kernel (block deleted → route gone), "
            "through the node runners. BIRD: route in the origin's kernel → route in every other node's kernel, "
            "same namespaces and sessions, after the podnet part. Per node: resident memory, CPU seconds for the "
            "whole run, CPU per route event (add or delete) beyond the idle rate, idle CPU.\n",
            "| topology | speaker | add: median (ms) | add: max (ms) | delete: median (ms) | delete: max (ms) "
            "| start to converged (s) | per node |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            *hops,
            "",
        ]
    )
    print(text)
    if not args.no_append:
        with RESULTS.open("a") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
