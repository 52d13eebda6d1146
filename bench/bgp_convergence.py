"""Benchmark: BGP convergence of podnet's speaker (ExaBGP + bridge + Python RIB/reflection) against BIRD 2, same
topologies, in one run, on network namespaces (needs root; takes the netns suite's lock).

    .venv/bin/python bench/bgp_convergence.py [--rounds 5] [--topology mesh10|rr30]

Topologies: 10 nodes in full mesh; 30 nodes with 2 route reflectors (mesh off). For each, a new /26 appears on one
(non-reflector) node and the time until every other node has it is measured:
  podnet: from ``Speaker.announce()`` until the prefix is in every other speaker's RIB (``best_routes``, seen by
          its ``on_change`` callback) — the kernel write is the routes helper's and is not included;
  BIRD:   from ``ip route add`` on the origin (BIRD's kernel protocol learns it) until the route is in every other
          node's kernel (``ip monitor route``) — this includes BIRD's kernel write, a slight handicap for BIRD.
Also: resident memory and CPU seconds per node of ExaBGP (plus its bridge) and of BIRD. Prints a table and appends
it to bench/results/bgp.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import functools
import logging
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

from bgp.plan import Defaults, identity, plan_peers
from bgp.speaker import Speaker, SpeakerConfig
from datastore import model as m
from testbed.netns import NetnsBed, NodeNs

LOCK = "/run/lock/podnet-netns.lock"
RESULTS = Path(__file__).resolve().parent / "results" / "bgp.md"
DEFAULTS = Defaults(hold_time=9, graceful_restart_time=30)
TICK = os.sysconf("SC_CLK_TCK")
REACTOR_SPEED = float(os.environ.get("PODNET_BENCH_REACTOR_SPEED", str(SpeakerConfig.reactor_speed)))


@dataclass
class Topology:
    name: str
    nodes: int
    reflectors: int


TOPOLOGIES = {"mesh10": Topology("10 nodes, full mesh", 10, 0), "rr30": Topology("30 nodes, 2 reflectors", 30, 2)}


def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out: {what}")
        time.sleep(0.05)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


@dataclass
class Result:
    impl: str
    topology: str
    times_ms: list[float]
    rss_mib: float
    cpu_s: float  # per node, over the whole run (sessions up + rounds)
    idle_pct: float  # per node, CPU while nothing changes (keepalives only)
    hops: list[str] = field(default_factory=list)  # --trace: where the time went


class TraceLog(logging.Handler):
    """Keeps the speakers' per-hop trace records (``podnet.trace``) in memory: (time, thread, message)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[tuple[float, str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.created, record.threadName or "", record.getMessage()))


TRACE = TraceLog()


def _node_of(thread: str) -> str:
    parts = thread.split("-")  # the speaker's threads are named bgp-<node>-<job>
    return parts[1] if len(parts) == 3 and parts[0] == "bgp" else ""


def _times(
    window: list[tuple[float, str, list[str]]], t0: float, prefix: str, event: str, who: Callable[[str], bool]
) -> list[float]:
    """Each matching node's first ``event`` for ``prefix`` (the announcement; later ones are the withdrawal), in
    milliseconds after t0, earliest node first."""
    first: dict[str, float] = {}
    for t, node, words in window:
        if words[:2] == [event, prefix] and who(node):
            first.setdefault(node, (t - t0) * 1000)
    return sorted(first.values())


def hop_table(starts: list[tuple[float, str, str]], reflectors: list[str], since: str = "announce()") -> list[str]:
    """Median milliseconds from ``announce()`` to each hop, over the rounds."""
    hops: dict[str, list[float]] = {}
    records = sorted(TRACE.records)
    for t0, origin, prefix in starts:
        window = [(t, _node_of(th), msg.split()) for t, th, msg in records if t0 <= t <= t0 + 30]
        at = functools.partial(_times, window, t0, prefix)
        rows = {
            "origin: command sent to the bridge": at("cmd-sent", lambda n, o=origin: n == o)[:1],
            "origin: command acked by ExaBGP": at("cmd-ack", lambda n, o=origin: n == o)[:1],
            "reflectors: UPDATE received (bridge event), first": at("update-recv", lambda n: n in reflectors)[:1],
            "reflectors: reflect command sent, first": at("cmd-sent", lambda n: n in reflectors)[:1],
            "reflectors: reflect command acked, last": at("cmd-ack", lambda n: n in reflectors)[-1:],
            "clients: UPDATE received (bridge event), first": at(
                "update-recv", lambda n, o=origin: n not in reflectors and n != o
            )[:1],
            "clients: UPDATE received (bridge event), last": at(
                "update-recv", lambda n, o=origin: n not in reflectors and n != o
            )[-1:],
        }
        for label, values in rows.items():
            hops.setdefault(label, []).extend(values)
    TRACE.records.clear()
    out = [f"| hop | median ms after {since} | min | max |", "|---|---|---|---|"]
    for label, values in hops.items():
        if values:
            out.append(f"| {label} | {statistics.median(values):.1f} | {min(values):.1f} | {max(values):.1f} |")
    return out


IDLE_WINDOW = 5.0


def idle_cpu_pct(pids: list[int]) -> float:
    """Mean CPU % per node over an idle window (``pids`` groups one node's processes by summing)."""
    before = [cpu_s(p) for p in pids]
    time.sleep(IDLE_WINDOW)
    after = [cpu_s(p) for p in pids]
    return 100 * sum(a - b for a, b in zip(after, before, strict=True)) / IDLE_WINDOW


def models_for(hosts: list[NodeNs], reflectors: int) -> dict[str, m.Node]:
    return {
        h.name: m.Node(name=h.name, ip=h.ip, rr_cluster_id="1.0.0.1" if i < reflectors else None)
        for i, h in enumerate(hosts)
    }


def run_podnet(hosts: list[NodeNs], topo: Topology, rounds: int, tmp: Path) -> Result:
    cfg = m.ClusterConfig(node_mesh=topo.reflectors == 0)
    models = models_for(hosts, topo.reflectors)
    speakers: dict[str, Speaker] = {}
    try:
        for h in hosts:
            config = SpeakerConfig(identity(models[h.name], cfg), reactor_speed=REACTOR_SPEED)
            sp = Speaker(config, tmp / h.name, netns=h.ns.name)
            sp.start()
            speakers[h.name] = sp
        for name, sp in speakers.items():
            sp.set_peers(plan_peers(name, models, cfg, (), DEFAULTS))
        wait_for(
            lambda: all(p.state == "Established" for sp in speakers.values() for p in sp.peer_status()),
            120,
            "podnet sessions",
        )
        times: list[float] = []
        starts: list[tuple[float, str, str]] = []  # wall clock, origin, prefix: for the trace
        lock = threading.Lock()
        clients = [h.name for h in hosts[topo.reflectors :]]
        for r in range(rounds):
            origin = clients[r % len(clients)]
            prefix = f"10.250.{r}.0/26"
            seen: dict[str, float] = {}
            done = threading.Event()
            others = [n for n in speakers if n != origin]

            def check(
                name: str,
                prefix: str = prefix,
                seen: dict[str, float] = seen,
                done: threading.Event = done,
                others: list[str] = others,
            ) -> None:
                if name in seen or prefix not in speakers[name].best_routes():
                    return
                with lock:
                    seen.setdefault(name, time.perf_counter())
                    if len(seen) == len(others):
                        done.set()

            for n in others:
                speakers[n]._callbacks[:] = [lambda n=n: check(n)]  # one observer per round
            t0 = time.perf_counter()
            starts.append((time.time(), origin, prefix))
            speakers[origin].announce([prefix])
            if not done.wait(30):
                raise RuntimeError(f"podnet: {prefix} reached {len(seen)}/{len(others)} nodes")
            times.append((max(seen.values()) - t0) * 1000)
            speakers[origin].announce([])
            wait_for(lambda p=prefix, o=others: all(p not in speakers[n].best_routes() for n in o), 30, "withdrawal")
        pids = [(sp.exabgp_pid, sp.bridge_pid) for sp in speakers.values()]
        rss = statistics.mean(rss_kib(e) + rss_kib(b) for e, b in pids if e and b) / 1024
        cpu = statistics.mean(cpu_s(e) + cpu_s(b) for e, b in pids if e and b)
        flat = [p for pair in pids for p in pair if p]
        idle = idle_cpu_pct(flat) / len(pids)
        hops = hop_table(starts, [h.name for h in hosts[: topo.reflectors]]) if TRACE.records else []
        return Result("podnet (ExaBGP)", topo.name, times, rss, cpu, idle, hops)
    finally:
        for sp in speakers.values():
            sp.stop()


def bird_conf(me: m.Node, models: dict[str, m.Node], topo: Topology) -> str:
    lines = [
        f"router id {me.address};",
        "protocol device { }",
        "protocol kernel { ipv4 { import where net ~ 10.250.0.0/16; export where source = RTS_BGP; }; learn; }",
    ]
    for i, other in enumerate(models.values()):
        if other.name == me.name:
            continue
        if topo.reflectors and me.rr_cluster_id is None and other.rr_cluster_id is None:
            continue  # clients peer with reflectors only
        rr = " rr client; rr cluster id 1.0.0.1;" if me.rr_cluster_id and other.rr_cluster_id is None else ""
        # The origin's route is a local blackhole (as a podnet node's own block is): a node sends it with itself as
        # the next hop, as podnet does and as Calico's BIRD configuration does; a reflector keeps the next hop.
        # Receivers install it via that next hop (a neighbor on the shared subnet: ``direct``) as podnet's nodes do.
        nh = "" if me.rr_cluster_id else " next hop self;"
        lines.append(
            f"protocol bgp p{i} {{ local {me.address} as 64512; neighbor {other.address} as 64512; direct;{rr}"
            f" hold time {DEFAULTS.hold_time}; connect retry time 2; error wait time 1, 10;"
            f" ipv4 {{ import all; export where net ~ 10.250.0.0/16;{nh} }}; }}"
        )
    return "\n".join(lines) + "\n"


def run_bird(
    bed: NetnsBed, hosts: list[NodeNs], topo: Topology, rounds: int, tmp: Path, *, podnet_reflectors: bool = False
) -> Result:
    """BIRD on every node; with ``podnet_reflectors`` the reflectors are podnet speakers instead, so that their
    fan-out is measured with clients that cost next to nothing (BIRD) instead of 28 more ExaBGPs."""
    models = models_for(hosts, topo.reflectors)
    birds = hosts[topo.reflectors :] if podnet_reflectors else hosts
    procs: dict[str, subprocess.Popen[str]] = {}
    ctl = {h.name: tmp / f"{h.name}.ctl" for h in birds}
    speakers: dict[str, Speaker] = {}
    try:
        if podnet_reflectors:
            cfg = m.ClusterConfig(node_mesh=False)
            for h in hosts[: topo.reflectors]:
                sp = Speaker(SpeakerConfig(identity(models[h.name], cfg)), tmp / h.name, netns=h.ns.name)
                sp.start()
                sp.set_peers(plan_peers(h.name, models, cfg, (), DEFAULTS))
                speakers[h.name] = sp
        for h in birds:
            conf = tmp / f"{h.name}.conf"
            conf.write_text(bird_conf(models[h.name], models, topo))
            procs[h.name] = h.ns.popen("bird", "-f", "-c", str(conf), "-s", str(ctl[h.name]))

        def all_up() -> bool:
            for h in birds:
                out = h.ns.run("birdc", "-s", str(ctl[h.name]), "show", "protocols", check=False).stdout
                rows = [line for line in out.splitlines() if line.startswith("p")]
                if not rows or any("Established" not in line for line in rows):
                    return False
            return all(p.state == "Established" for sp in speakers.values() for p in sp.peer_status())

        wait_for(all_up, 120, "BIRD sessions")
        times: list[float] = []
        starts: list[tuple[float, str, str]] = []
        lock = threading.Lock()
        clients = hosts[topo.reflectors :]
        for r in range(rounds):
            origin = clients[r % len(clients)]
            prefix = f"10.250.{r}.0/26"
            others = [h for h in birds if h is not origin]  # (podnet reflectors write no kernel route)
            monitors = [
                subprocess.Popen(["ip", "-n", h.ns.name, "monitor", "route"], stdout=subprocess.PIPE, text=True)
                for h in others
            ]
            seen: list[float] = []

            def watch(proc: subprocess.Popen[str], prefix: str = prefix, seen: list[float] = seen) -> None:
                assert proc.stdout is not None
                for line in proc.stdout:
                    if prefix in line and not line.startswith("Deleted"):
                        with lock:
                            seen.append(time.perf_counter())
                        return

            threads = [threading.Thread(target=watch, args=(p,), daemon=True) for p in monitors]
            for t in threads:
                t.start()
            time.sleep(0.2)  # monitors subscribed
            t0 = time.perf_counter()
            starts.append((time.time(), origin.name, prefix))
            origin.ns.ip("route", "add", "blackhole", prefix)
            for t in threads:
                t.join(30)
            for p in monitors:
                p.kill()
                p.wait()
            if len(seen) != len(others):
                raise RuntimeError(f"BIRD: {prefix} reached {len(seen)}/{len(others)} nodes")
            times.append((max(seen) - t0) * 1000)
            origin.ns.ip("route", "del", "blackhole", prefix)
            time.sleep(0.3)
        if podnet_reflectors:
            pairs = [(sp.exabgp_pid, sp.bridge_pid) for sp in speakers.values()]
            flat = [p for pair in pairs for p in pair if p]
            rss = statistics.mean(rss_kib(e) + rss_kib(b) for e, b in pairs if e and b) / 1024
            cpu = statistics.mean(cpu_s(e) + cpu_s(b) for e, b in pairs if e and b)
            rrs = [h.name for h in hosts[: topo.reflectors]]
            hops = hop_table(starts, rrs, "the origin's kernel route") if TRACE.records else []
            impl = "podnet reflectors (ExaBGP), BIRD clients; usage: per reflector"
            return Result(impl, topo.name, times, rss, cpu, idle_cpu_pct(flat) / len(pairs), hops)
        pids = [p.pid for p in procs.values()]
        rss = statistics.mean(rss_kib(p) for p in pids) / 1024
        cpu = statistics.mean(cpu_s(p) for p in pids)
        return Result("BIRD 2", topo.name, times, rss, cpu, idle_cpu_pct(pids) / len(pids))
    finally:
        for p in procs.values():
            bed.stop_process(p)
            bed.processes.remove(p)
        for sp in speakers.values():
            sp.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--topology", choices=sorted(TOPOLOGIES), action="append")
    ap.add_argument("--trace", action="store_true", help="per-hop timestamps of the podnet speakers")
    ap.add_argument(
        "--mixed",
        action="store_true",
        help="with reflectors: also podnet reflectors with BIRD clients (the reflectors' fan-out without 28 ExaBGPs)",
    )
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to the results file")
    args = ap.parse_args()
    if args.trace:
        tracer = logging.getLogger("podnet.trace")
        tracer.setLevel(logging.DEBUG)
        tracer.propagate = False
        tracer.addHandler(TRACE)
    results: list[Result] = []
    os.makedirs(os.path.dirname(LOCK), exist_ok=True)
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for key in args.topology or ["mesh10", "rr30"]:
            topo = TOPOLOGIES[key]
            tmp = Path(tempfile.mkdtemp(prefix="podnet-bgp-bench-"))
            try:
                with NetnsBed() as bed:
                    underlay = bed.underlay()
                    hosts = [bed.node(f"n{i}", underlay, 11 + i) for i in range(topo.nodes)]
                    results.append(run_podnet(hosts, topo, args.rounds, tmp / "podnet"))
                    (tmp / "bird").mkdir()
                    results.append(run_bird(bed, hosts, topo, args.rounds, tmp / "bird"))
                    if args.mixed and topo.reflectors:
                        (tmp / "mixed").mkdir()
                        results.append(run_bird(bed, hosts, topo, args.rounds, tmp / "mixed", podnet_reflectors=True))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    header = (
        "| topology | speaker | convergence median (ms) | max (ms) | RSS per node (MiB) | CPU per node, whole run (s) "
        "| idle CPU per node (%) |"
    )
    rows = [header, "|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(
            f"| {r.topology} | {r.impl} | {statistics.median(r.times_ms):.1f} | {max(r.times_ms):.1f} | "
            f"{r.rss_mib:.1f} | {r.cpu_s:.2f} | {r.idle_pct:.2f} |"
        )
    table = "\n".join(rows)
    print(table)
    for r in results:
        if r.hops:
            print(f"\n{r.topology}:\n" + "\n".join(r.hops))
    if args.no_append:
        return 0
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as fh:
        when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        load = os.getloadavg()[0]
        fh.write(
            f"\n## {when}: `bench/bgp_convergence.py --rounds {args.rounds}` ({os.cpu_count()} CPUs, "
            f"load average {load:.1f} at the end)\n\n"
        )
        fh.write(table + "\n")
        for r in results:
            if r.hops:
                fh.write(f"\nWhere the time goes, {r.topology}, {r.impl} (`--trace`):\n\n" + "\n".join(r.hops) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
