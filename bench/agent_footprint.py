"""Benchmark: the node agent's footprint and speed, ``podnet-agent`` (one process) vs the old three processes.

    sudo .venv/bin/python bench/agent_footprint.py [--quick] [--changes 60] [--idle 30] [--no-write]

One run, one model, both setups one after the other. The model is a real cluster's datastore (bench/policy_model.py):
1 000 nodes with 10 pods each, the measured node brought to 100 (10 090 pods), 1 000 policies, node records, the pool,
blocks and affinities, endpoints, pods and namespaces, in a real etcd (``--quick``: 100 nodes, 1 090 pods, 100
policies). The measured node
is a network namespace on a test-bed underlay; its 100 local pods' host interfaces exist there (veth pairs).
``nodeToNodeMesh`` is off and there are no BGP peers (routes to other nodes' blocks come from the datastore, VXLAN),
so readiness does not wait on peers; ExaBGP and its bridge still run.

- A (old): ``python -m agent.router`` (the node runner's CLI; ``agent.node_runner`` before) +
  ``python -m agent.dataplane.run --etcd-endpoints`` + ``podnet-cni serve``;
- B (new): ``podnet-agent`` (ExaBGP and its bridge, in the node's namespace, and its CNI server process are its
  children).

Each setup is started twice. First with its default periods: start → ready (B: ``/readiness`` 200; A: the first
"synced" line of the policy writer, the node runner's first pass in its ``--trace`` and the CNI server's "ready"),
resident memory (VmRSS, and PSS from smaps_rollup, of the agent process(es), ExaBGP and the bridge), CPU of all of
them over ``--idle`` seconds with nothing changing (utime + stime + reaped children's, % of one core), then
``--changes`` policy changes that concern a local pod (one port of a policy selecting it) → the new rule in the
kernel (seen by ``xtables-monitor -e`` in the namespace: the time the kernel announces the rule). Then stopped and
started again with a 5 s sync period (the verify pass: policy read-back and route verify), and CNI ADDs, 10 at a
time with the compiled client (as bench/ipam_cni.py), then DEL, round after round for two sync periods; ADDs that
overlapped a kernel read-back (an ``iptables-*-save`` child of the agent) are counted apart.

Appends the figures to bench/results/agent_footprint.md (and .json). Needs root; takes the netns lock.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import netns_lock
from bench.ipam_cni import COMPILED, cni_call, cpu_seconds, pct
from bench.machine import describe
from bench.policy_model import (
    APPS,
    BLOCK,
    POD_NET,
    POOL,
    RESERVED_BLOCKS,
    Cluster,
    container_id,
    iface,
    synthetic,
)
from cni.link import pod_mac
from datastore import codec
from datastore import model as m
from datastore.etcd import EtcdClient, Put
from datastore.store import Store
from ipam.allocator import pod_handle
from testbed.etcd_server import EtcdServer
from testbed.netns import NetnsBed, NodeNs, Underlay

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "agent_footprint.md"
BIN = Path(sys.executable).parent
NODE = "n1"
LOCAL = 100  # pods on the measured node
PER_NODE = 10  # pods on every other node: 10 000 pods on 1 000 nodes
SYNC_PERIOD = 5.0
TARGETS = {"ready_s": 5.0, "change_p99_ms": 50.0, "rss_mib": 150.0, "idle_cpu_pct": 1.0, "add_p99_ms": 100.0}
TRANSIENT = ("iptables", "ip6tables", "ipset", "xtables", "ip", "nft", "conntrack", "sysctl")


# --- processes ---------------------------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                out.extend(int(c) for c in (task / "children").read_text().split())
    return out


def tree(pids: list[int]) -> list[int]:
    """``pids`` and all their descendants."""
    found, todo = [], list(pids)
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children(p))
    return found


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except (FileNotFoundError, ProcessLookupError):
        return []


def label(pid: int) -> str:
    """What a process is, for the tables: ExaBGP, its bridge, or the Python module / console script it runs."""
    argv = cmdline(pid)
    text = " ".join(argv)
    if "exabgp" in text and "bridge" not in text:
        return "ExaBGP"
    if "bridge" in text:
        return "bridge"
    for i, a in enumerate(argv):
        if a == "-m" and i + 1 < len(argv):
            return argv[i + 1]
    for i, a in enumerate(argv):
        if Path(a).name.startswith("podnet-"):
            return " ".join([Path(a).name, *[x for x in argv[i + 1 : i + 2] if not x.startswith("-")]])
    return Path(argv[0]).name if argv else "?"


def persistent(pids: list[int]) -> list[int]:
    """The long-running processes of a tree: not the iptables/ipset/ip runs a sync starts and reaps."""
    return [p for p in tree(pids) if cmdline(p) and Path(cmdline(p)[0]).name.split("-")[0] not in TRANSIENT]


def memory(pid: int) -> dict[str, float]:
    """MiB: VmRSS and VmHWM (/proc/PID/status), Pss and Anonymous (smaps_rollup)."""
    out: dict[str, float] = {}
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(line.split()[1]) / 1024
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key = line.split(":")[0]
            if key in ("Pss", "Anonymous"):
                out[key] = int(line.split()[1]) / 1024
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass
class Setup:
    """One way of running the node: its processes, log files and the test of readiness."""

    name: str
    commands: list[tuple[str, list[str]]]  # (log name, argv)
    ready: Callable[[Setup], bool]
    procs: list[subprocess.Popen[bytes]] = dataclasses.field(default_factory=list)
    logs: dict[str, Path] = dataclasses.field(default_factory=dict)
    started_wall: float = 0.0

    def start(self, workdir: Path, phase: str) -> None:
        self.started_wall = time.time()
        for log_name, argv in self.commands:
            path = workdir / f"{self.name}-{phase}-{log_name}.log"
            self.logs[log_name] = path
            with open(path, "ab") as fh:
                self.procs.append(
                    subprocess.Popen(
                        argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                        start_new_session=True,
                    )
                )  # fmt: skip

    def log(self, name: str) -> str:
        with contextlib.suppress(OSError):
            return self.logs[name].read_text(errors="replace")
        return ""

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()

    def check_alive(self) -> None:
        for (name, _), p in zip(self.commands, self.procs, strict=True):
            if p.poll() is not None:
                raise RuntimeError(f"{self.name}: {name} exited {p.returncode}:\n{self.log(name)[-3000:]}")


def old_setup(ns: str, endpoint: str, work: Path, sock: str, *, period: float | None, phase: str) -> Setup:
    # The runner logs a pass only when it wrote something; its trace marks every pass (a restart writes nothing).
    trace = work / f"old-{phase}-runner.trace"
    runner = [sys.executable, "-m", "agent.router", "--node-name", NODE, "--netns", ns, "--etcd-endpoints", endpoint,
              "--workdir", str(work / "old-bgp"), "--trace", str(trace)]  # fmt: skip
    policy = [sys.executable, "-m", "agent.dataplane.run", "--etcd-endpoints", endpoint, "--node-name", NODE,
              "--netns", ns]  # fmt: skip
    if period is not None:
        runner += ["--sync-period", f"{period:g}s"]
        policy += ["--sync-period", f"{period:g}s"]

    def ready(s: Setup) -> bool:
        return (
            "synced " in s.log("policy")
            and trace.exists()
            and "routes-written" in trace.read_text(errors="replace")
            and any(line.startswith("ready") for line in s.log("cni").splitlines())
        )

    cni = [str(BIN / "podnet-cni"), "serve", "--cni-socket", sock]
    return Setup("old", [("runner", runner), ("policy", policy), ("cni", cni)], ready)


def new_setup(ns: str, endpoint: str, work: Path, sock: str, port: int, *, period: float | None) -> Setup:
    argv = [str(BIN / "podnet-agent"), "--node-name", NODE, "--netns", ns, "--etcd-endpoints", endpoint,
            "--workdir", str(work / "new-agent"), "--health-bind", f"127.0.0.1:{port}",
            "--cni-socket", sock]  # fmt: skip
    if period is not None:
        argv += ["--sync-period", f"{period:g}s"]

    def ready(_: Setup) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readiness", timeout=2) as r:
                return int(r.status) == 200
        except (urllib.error.URLError, OSError):
            return False

    return Setup("new", [("agent", argv)], ready)


def wait_ready(s: Setup, timeout: float = 180.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        s.check_alive()
        if s.ready(s):
            return time.monotonic() - t0
        time.sleep(0.02)
    logs = "\n".join(f"--- {n}\n{s.log(n)[-3000:]}" for n, _ in s.commands)
    raise RuntimeError(f"{s.name} not ready within {timeout:.0f} s\n{logs}")


def log_phases(s: Setup) -> dict[str, float]:
    """Seconds from the start to the first log line of each phase (the new agent's UTC timestamps)."""
    marks = {
        "first log line": r".",
        "datastore in sync": r"datastore in sync",
        "first policy sync": r"policy sync rev",
        "first routes written": r"routes: ",
        "started (components)": r"podnet-agent .* started on",
    }
    out: dict[str, float] = {}
    for line in s.log("agent").splitlines():
        stamp = line.split(" ", 1)[0]
        try:
            t = dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC).timestamp()
        except ValueError:
            continue
        for name, pattern in marks.items():
            if name not in out and re.search(pattern, line.split(" ", 1)[1]):
                out[name] = t - s.started_wall
    return out


# --- the model ---------------------------------------------------------------------------------------------------


def model(pods: int, policies: int) -> Cluster:
    """``pods`` pods at PER_NODE a node (1 000 nodes for 10 000 pods), then the measured node brought to LOCAL pods
    (in blocks of its own after every other node's), as a node of a real cluster sees the datastore."""
    cluster = synthetic(pods, policies, NODE, PER_NODE, namespaces=max(1, pods // 100))
    n_ns = len(cluster.namespaces)
    first = RESERVED_BLOCKS + -(-pods // PER_NODE) * -(-(PER_NODE + 1) // BLOCK)
    extra = LOCAL - PER_NODE
    cidrs = [f"{POD_NET.network_address + (first + b) * BLOCK}/{POOL.block_size}" for b in range(-(-extra // BLOCK))]
    allocations: list[dict[int, m.Allocation]] = [{} for _ in cidrs]
    for q in range(extra):
        i = pods + q
        ns, pod = f"ns{i % n_ns}", f"p{i}"
        b, ordinal = divmod(q, BLOCK)
        ip = str(ipaddress.IPv4Network(cidrs[b]).network_address + ordinal)
        cid = container_id(ns, pod)
        allocations[b][ordinal] = m.Allocation(pod_handle(cid), f"{ns}/{pod}", "pod")
        labels = {"app": APPS[i % len(APPS)], "tier": f"t{i % 3}", "idx": str(i % 10)}
        cluster.pods.append(m.Pod(ns, pod, labels, (ip,), NODE, (m.NamedPort("http", 8080 + i % 2, "TCP"),)))
        cluster.endpoints.append(
            m.Endpoint(NODE, ns, pod, "eth0", iface(ns, pod), (f"{ip}/32",), pod_mac(cid), cid, pod_handle(cid))
        )
    for cidr, allocs in zip(cidrs, allocations, strict=True):
        cluster.blocks.append(m.Block(cidr, f"node:{NODE}", allocs))
        cluster.affinities.append(m.Affinity(NODE, cidr))
    return cluster


def load_model(client: EtcdClient, pods: int, policies: int, node_ip: str) -> tuple[list[m.Policy], int]:
    """Fill etcd; returns the port policies that select a local pod, and the keys written."""
    cluster = model(pods, policies)
    cluster.nodes[0] = dataclasses.replace(cluster.nodes[0], ip=node_ip)
    objs: list[codec.Model] = [m.ClusterConfig(node_mesh=False), *cluster.objects()]
    for i in range(0, len(objs), 100):
        client.txn([], [Put(codec.key_of(o).path, codec.encode(o)) for o in objs[i : i + 100]])
    local = [p for p in cluster.pods if p.node == NODE]
    chosen = []
    for pol in cluster.policies:
        spec = pol.spec
        ingress = spec.get("ingress")
        if not isinstance(ingress, list) or "ports" not in json.dumps(ingress):
            continue
        selector = spec.get("podSelector")
        want = selector.get("matchLabels") if isinstance(selector, dict) else None
        if isinstance(want, dict) and any(
            p.namespace == pol.namespace and all(p.labels.get(k) == v for k, v in want.items()) for p in local
        ):
            chosen.append(pol)
    return chosen, len(objs)


def node_namespace(bed: NetnsBed, ul: Underlay, name: str, host: int, pods: int) -> NodeNs:
    """The node and its local pods' host interfaces (named as the CNI names them)."""
    node = bed.node(name, ul, host)
    cluster = model(pods, 0)
    names = [e.host_iface for e in cluster.endpoints if e.node == NODE]
    # veth pairs with both ends in the node (this kernel has no dummy driver loaded)
    batch = "".join(
        f"link add {n} type veth peer name fp{i}\nlink set fp{i} up\nlink set {n} up\n" for i, n in enumerate(names)
    )
    subprocess.run(["ip", "-n", node.ns.name, "-batch", "-"], input=batch, text=True, check=True)
    assert names[0] == iface(cluster.endpoints[0].namespace, cluster.endpoints[0].pod)
    return node


# --- measurements ------------------------------------------------------------------------------------------------


class RuleMonitor:
    """``xtables-monitor -e`` in the node's namespace: each rule the kernel adds, with the time we read it."""

    def __init__(self, ns: str) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, "stdbuf", "-oL", "xtables-monitor", "-e", "-4"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
        )  # fmt: skip
        self.lines: list[tuple[float, str]] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            t = time.perf_counter()
            with self.cond:
                self.lines.append((t, line))
                self.cond.notify_all()

    def wait_for(self, text: str, after: float, timeout: float = 30.0) -> float:
        def hit() -> float | None:
            return next((t for t, line in self.lines if t >= after and text in line), None)

        with self.cond:
            self.cond.wait_for(lambda: hit() is not None, timeout=timeout)
            found = hit()
        if found is None:
            tail = "".join(line for _, line in self.lines[-5:]) + f"(monitor exit status: {self.proc.poll()})"
            raise RuntimeError(f"no rule with {text!r} within {timeout:.0f} s; the monitor's last lines:\n{tail}")
        return found

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def changes(store: Store, monitor: RuleMonitor, policies: list[m.Policy], n: int, base: int) -> list[float]:
    """Seconds from each etcd put to the changed rule in the kernel."""
    out = []
    for i in range(n):
        pol = policies[i % len(policies)]
        spec = json.loads(json.dumps(pol.spec))
        port = base + i
        spec["ingress"][0]["ports"][0]["port"] = port
        t = time.perf_counter()
        store.put(m.Policy(pol.namespace, pol.name, spec))
        out.append(monitor.wait_for(f"dport {port}", t) - t)
        time.sleep(0.1)
    return out


def idle_cpu(pids: list[int], seconds: float) -> tuple[float, dict[str, float]]:
    """% of one core used by ``pids`` (with the children they reaped meanwhile), in all and per process."""
    before = {p: cpu_seconds(p) for p in pids}
    time.sleep(seconds)
    per: dict[str, float] = {}
    for p in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            per[f"{label(p)} ({p})"] = (cpu_seconds(p) - before[p]) / seconds * 100
    return sum(per.values()), per


class SaveWatch:
    """When the agent reads the kernel back (an ``iptables-*-save`` child): the verify pass, seen from outside."""

    def __init__(self, roots: list[int]) -> None:
        self.roots = roots
        self.seen: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            # the tools run as `ip netns exec NS iptables-nft-save …`
            if any(any(a.endswith("-save") for a in cmdline(p)) for p in tree(self.roots)):
                self.seen.append(time.perf_counter())
            self.stop.wait(0.02)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()

    def overlaps(self, start: float, end: float) -> bool:
        return any(start <= t <= end for t in self.seen)


def cni_rounds(
    bed: NetnsBed, node: NodeNs, *, endpoint: str, sock: str, roots: list[int], seconds: float, tag: str
) -> dict[str, Any]:
    """10 concurrent ADDs, then their DELs, round after round for ``seconds``; ADD latencies (ms)."""
    sandboxes = [bed.netns(f"{tag}s{i}") for i in range(10)]
    conf: dict[str, object] = {"cniVersion": "1.0.0", "name": "podnet", "type": "podnet-cni",
                               "etcdEndpoints": [endpoint], "nodeName": NODE,
                               "hostNetns": f"/var/run/netns/{node.ns.name}"}  # fmt: skip
    watch = SaveWatch(roots)
    procs = persistent(roots)
    cpu_before = {p: cpu_seconds(p) for p in procs}
    t_start = time.monotonic()
    lat: list[float] = []
    during_verify: list[float] = []
    rounds = 0
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:

            def call(i: int, command: str, r: int = rounds) -> tuple[float, float, int, str]:
                t = time.perf_counter()
                took, code, out = cni_call([COMPILED], command, conf, cid=f"{tag}r{r}c{i}",
                                           netns=f"/var/run/netns/{sandboxes[i].name}", name=f"{tag}-{i}",
                                           sock=sock)  # fmt: skip
                return t, took, code, out

            with ThreadPoolExecutor(10) as pool:
                adds = list(pool.map(lambda i: call(i, "ADD"), range(10)))
            bad = [out for _, _, code, out in adds if code != 0]
            if bad:
                raise RuntimeError(f"{len(bad)} ADDs failed: {bad[0]}")
            for t, took, _, _ in adds:
                lat.append(took * 1000)
                if watch.overlaps(t, t + took):
                    during_verify.append(took * 1000)
            with ThreadPoolExecutor(10) as pool:
                dels = list(pool.map(lambda i: call(i, "DEL"), range(10)))
            if any(code != 0 for _, _, code, _ in dels):
                raise RuntimeError("DEL failed")
            rounds += 1
    finally:
        watch.close()
    window = time.monotonic() - t_start
    cpu = {}
    for p in procs:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            cpu[label(p)] = (cpu_seconds(p) - cpu_before[p]) / window * 100
    return {
        "cpu_pct": cpu,
        "adds": len(lat),
        "rounds": rounds,
        "p50_ms": statistics.median(lat),
        "p99_ms": pct(lat, 99),
        "max_ms": max(lat),
        "verify_reads_seen": len(watch.seen),
        "during_verify": len(during_verify),
        "during_verify_p99_ms": pct(during_verify, 99) if during_verify else float("nan"),
    }


def server_steps(log: str) -> dict[str, tuple[float, float]]:
    """The CNI server's own share of each ADD and its steps, p50 / p99 ms, from its log lines
    ("ADD <id> -> 0 in 12.3 ms (parse 0.1, lock 2.0, ...)")."""
    steps: dict[str, list[float]] = {}
    for total, parts in re.findall(r"ADD \S+ -> 0 in ([0-9.]+) ms \(([^)]*)\)", log):
        steps.setdefault("in the server", []).append(float(total))
        for part in filter(None, parts.split(", ")):
            name, ms = part.rsplit(" ", 1)
            steps.setdefault(name, []).append(float(ms))
    return {k: (statistics.median(v), pct(v, 99)) for k, v in steps.items()}


def measure(
    kind: str, bed: NetnsBed, ul: Underlay, *, host: int, store: Store, endpoint: str, policies: list[m.Policy],
    args: argparse.Namespace, work: Path,
) -> dict[str, Any]:  # fmt: skip
    ip = f"{ul.subnet.network_address + host}/{ul.subnet.prefixlen}"
    found = store.get(codec.key_of(m.Node(NODE, ip)), m.Node)
    assert found is not None
    store.put(dataclasses.replace(found.value, ip=ip))
    node = node_namespace(bed, ul, f"node-{kind}", host, args.pods)
    sock = f"/run/podnet-footprint-{os.getpid()}-{kind}.sock"
    port = free_port()

    def make(period: float | None) -> Setup:
        if kind == "old":
            return old_setup(
                node.ns.name, endpoint, work, sock, period=period, phase="first" if period is None else "restart"
            )
        return new_setup(node.ns.name, endpoint, work, sock, port, period=period)

    res: dict[str, Any] = {"setup": kind}
    s = make(None)
    monitor: RuleMonitor | None = None
    try:
        s.start(work, "first")
        res["ready_s"] = wait_ready(s)
        if kind == "new":
            res["phases"] = log_phases(s)
        time.sleep(args.settle)
        s.check_alive()
        procs = persistent(s.pids())
        res["processes"] = {f"{label(p)} ({p})": memory(p) for p in procs}
        res["rss_mib"] = sum(v.get("VmRSS", 0.0) for v in res["processes"].values())
        res["pss_mib"] = sum(v.get("Pss", 0.0) for v in res["processes"].values())
        res["idle_cpu_pct"], res["idle_cpu_per_process"] = idle_cpu(procs, args.idle)
        # Started now: the first sync's burst of events overflows its netlink socket and it stops reading.
        monitor = RuleMonitor(node.ns.name)
        time.sleep(0.5)
        lat = changes(store, monitor, policies, args.changes, 20000 if kind == "old" else 30000)
        res["change_p50_ms"] = statistics.median(lat) * 1000
        res["change_p99_ms"] = pct(lat, 99) * 1000
        res["change_max_ms"] = max(lat) * 1000
        # The policy writer's own share (its incremental syncs, iptables-restore included) from its log; the rest
        # of a change's time is etcd, the watch, the cache and the compiler (and, in one process, waiting for the GIL).
        writes = [float(x) for x in re.findall(r"policy sync rev \d+ \(incremental\).* in ([0-9.]+) ms",
                                               s.log("policy" if kind == "old" else "agent"))]  # fmt: skip
        res["sync_ms"] = (statistics.median(writes), pct(writes, 99)) if writes else (float("nan"), float("nan"))
        res["rss_after_changes_mib"] = sum(memory(p).get("VmRSS", 0.0) for p in persistent(s.pids()))
        s.check_alive()
    finally:
        s.stop()
    s2 = make(SYNC_PERIOD)
    try:
        s2.start(work, "restart")
        res["restart_ready_s"] = wait_ready(s2)
        time.sleep(1.0)
        res["cni"] = cni_rounds(
            bed, node, endpoint=endpoint, sock=sock, roots=s2.pids(), seconds=args.cni_seconds, tag=f"{kind[0]}c"
        )
        res["cni"]["steps"] = server_steps(s2.log("cni" if kind == "old" else "agent"))
        s2.check_alive()
    finally:
        s2.stop()
        if monitor is not None:
            monitor.close()
        subprocess.run([str(BIN / "podnet-agent"), "cleanup", "--netns", node.ns.name, "--node", NODE,
                        "--etcd-endpoints", endpoint], capture_output=True, check=False)  # fmt: skip
    return res


HEAP_CHILD = r"""
import json, sys, threading, time
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
out = {"interpreter": rss()}
import daemon.node  # everything the agent imports
from agent.cache import Cache
from agent.policy_feed import PolicyFeed
from datastore.etcd import EtcdClient
out["imports (daemon.node)"] = rss()
cache = Cache(EtcdClient([sys.argv[1]])).start()
assert cache.in_sync.wait(120)
out["cache in sync"] = rss()
snap = cache.snapshot()
out["a snapshot held"] = rss()
feed = PolicyFeed(cache, sys.argv[2], refused=dict)
assert feed.desired() is not None
out["policy compiled (node's state)"] = rss()
print(json.dumps(out))
"""


def heap_steps(endpoint: str) -> dict[str, float]:
    """RSS (MiB) of a fresh process after each step the agent takes on this model: where its memory goes."""
    out = subprocess.run([sys.executable, "-c", HEAP_CHILD, endpoint, NODE], capture_output=True, text=True,
                         cwd=ROOT, check=False, timeout=300)  # fmt: skip
    if out.returncode != 0:
        print(out.stderr[-2000:], file=sys.stderr)
        return {}
    steps: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return steps


# --- report ------------------------------------------------------------------------------------------------------


def verdict(value: float, target: float, unit: str) -> str:
    if value <= target:
        return f"met ({value:.1f} {unit} ≤ {target:g} {unit})"
    return f"NOT met ({value:.1f} {unit}, {value - target:.1f} {unit} ({value / target:.1f}x) over {target:g} {unit})"


def report(
    rows: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    load: str,
    head: str,
    *,
    keys: int,
    heap: dict[str, float],
) -> str:
    names = {
        "old": "A: old (agent.router, was node_runner + dataplane.run + podnet-cni serve)",
        "new": "B: podnet-agent",
    }
    stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    nodes = -(-args.pods // PER_NODE)
    lines = [
        f"### Agent footprint, {stamp} UTC{' (--quick)' if args.quick else ''}: {nodes} nodes, "
        f"{args.pods + LOCAL - PER_NODE} pods ({LOCAL} on the node, {PER_NODE} on each other), "
        f"{args.policies} policies ({keys} keys in etcd)",
        "",
        f"{load}; head `{head}`. Reproduce: `sudo .venv/bin/python bench/agent_footprint.py"
        f"{' --quick' if args.quick else ''}`.",
        "",
        "| setup | start → ready | restart → ready (5 s sync period, kernel state kept) | RSS (PSS) | "
        f"idle CPU over {args.idle:g} s | policy change → kernel p50 / p99 / max ({args.changes}) | "
        "CNI ADD p50 / p99 / max under verify | ADDs (during a kernel read-back, their p99) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, r in rows.items():
        c = r["cni"]
        lines.append(
            f"| {names[kind]} | {r['ready_s']:.2f} s | {r['restart_ready_s']:.2f} s "
            f"| {r['rss_mib']:.0f} MiB ({r['pss_mib']:.0f}) | {r['idle_cpu_pct']:.2f} % "
            f"| {r['change_p50_ms']:.0f} / {r['change_p99_ms']:.0f} / {r['change_max_ms']:.0f} ms "
            f"| {c['p50_ms']:.0f} / {c['p99_ms']:.0f} / {c['max_ms']:.0f} ms "
            f"| {c['adds']} ({c['during_verify']}, {c['during_verify_p99_ms']:.0f} ms) |"
        )
    lines += ["", "Per process (MiB: VmRSS / PSS / anonymous; idle CPU % of one core):", ""]
    for kind, r in rows.items():
        parts = []
        for name, mem in r["processes"].items():
            cpu = r["idle_cpu_per_process"].get(name, float("nan"))
            parts.append(
                f"{name.rsplit(' (', 1)[0]} {mem.get('VmRSS', 0):.0f} / {mem.get('Pss', 0):.0f} / "
                f"{mem.get('Anonymous', 0):.0f}, {cpu:.2f} %"
            )
        lines.append(f"- {names[kind]}: " + "; ".join(parts))
    lines += ["", "A policy change's share in the policy writer (its incremental sync as it logs it, p50 / p99; "
              "the rest is etcd, the watch, the cache and the compiler):", ""]  # fmt: skip
    for kind, r in rows.items():
        lines.append(f"- {names[kind]}: {r['sync_ms'][0]:.1f} / {r['sync_ms'][1]:.1f} ms")
    lines += ["", "Where a CNI ADD's time goes inside the server (ms, p50 / p99; the rest is the client process, "
              "connect and the accept queue):", ""]  # fmt: skip
    for kind, r in rows.items():
        steps = ", ".join(f"{k} {v[0]:.1f} / {v[1]:.1f}" for k, v in r["cni"].get("steps", {}).items())
        cpu = ", ".join(f"{k} {v:.0f} %" for k, v in r["cni"].get("cpu_pct", {}).items())
        lines.append(f"- {names[kind]}: {steps or 'no step lines in the log'}; CPU meanwhile (% of one core): {cpu}")
    if heap:
        prev, parts = 0.0, []
        for name, mib in heap.items():
            parts.append(f"{name} {mib:.0f} MiB (+{mib - prev:.0f})")
            prev = mib
        lines += ["", "Where the agent's memory goes (RSS of a fresh process after each step on this model): "
                  + ", ".join(parts) + "."]  # fmt: skip
    new = rows.get("new")
    if new is not None:
        if new.get("phases"):
            ph = ", ".join(f"{k} {v:.2f} s" for k, v in sorted(new["phases"].items(), key=lambda kv: kv[1]))
            lines += ["", f"B's start from its log (seconds after exec): {ph}."]
        lines += [
            "",
            "Targets (B):",
            "",
            f"- start → ready ≤ 5 s: {verdict(new['ready_s'], TARGETS['ready_s'], 's')}",
            f"- policy change → kernel p99 ≤ 50 ms: {verdict(new['change_p99_ms'], TARGETS['change_p99_ms'], 'ms')}",
            "- RSS of agent + ExaBGP + bridge (+ its CNI server process, if any) ≤ 150 MiB: "
            f"{verdict(new['rss_mib'], TARGETS['rss_mib'], 'MiB')}",
            f"- idle CPU ≤ 1 % of a core: {verdict(new['idle_cpu_pct'], TARGETS['idle_cpu_pct'], '%')}",
            f"- CNI ADD p99 ≤ 100 ms under verify: {verdict(new['cni']['p99_ms'], TARGETS['add_p99_ms'], 'ms')}",
        ]
    return "\n".join([*lines, ""])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: 1 000 pods, 100 policies, short phases")
    ap.add_argument("--changes", type=int, default=None, help="policy changes per setup (default 60; quick 20)")
    ap.add_argument("--idle", type=float, default=None, help="idle CPU window, seconds (default 30; quick 10)")
    ap.add_argument("--only", choices=("old", "new"), default=None, help="measure one setup only")
    ap.add_argument("--no-write", action="store_true", help="print, do not append to bench/results/")
    args = ap.parse_args()
    args.pods, args.policies = (1000, 100) if args.quick else (10000, 1000)
    args.changes = args.changes or (20 if args.quick else 60)
    args.idle = args.idle or (10.0 if args.quick else 30.0)
    args.settle = 3.0 if args.quick else 10.0
    args.cni_seconds = SYNC_PERIOD + 1 if args.quick else 2 * SYNC_PERIOD + 1
    if not os.access(COMPILED, os.X_OK):
        raise SystemExit(f"{COMPILED} is missing: run scripts/bootstrap (it builds the compiled client)")
    lock = netns_lock.hold()  # noqa: F841 - held until the process exits
    load_before = os.getloadavg()[0]
    git = subprocess.run(["git", "log", "-1", "--format=%h %s"], capture_output=True, text=True, check=False, cwd=ROOT)
    head = os.environ.get("BENCH_HEAD") or git.stdout.strip()[:90]
    work = Path(tempfile.mkdtemp(prefix="podnet-footprint-"))
    server = EtcdServer().start()
    rows: dict[str, dict[str, Any]] = {}
    heap: dict[str, float] = {}
    try:
        client = EtcdClient([server.endpoint])
        store = Store(client)
        with NetnsBed() as bed:
            ul = bed.underlay()
            policies, keys = load_model(client, args.pods, args.policies, f"192.168.77.10/{ul.subnet.prefixlen}")
            heap = heap_steps(server.endpoint)
            for host, kind in ((10, "old"), (11, "new")):
                if args.only in (None, kind):
                    rows[kind] = measure(
                        kind, bed, ul, host=host, store=store, endpoint=server.endpoint, policies=policies,
                        args=args, work=work,
                    )  # fmt: skip
                    print(json.dumps(rows[kind]), flush=True)
        client.close()
    except BaseException:
        print(f"logs kept in {work}", file=sys.stderr)
        raise
    finally:
        server.stop()
    shutil.rmtree(work, ignore_errors=True)
    text = report(rows, args, describe(load_before), head, keys=keys, heap=heap)
    print(text)
    if not args.no_write:
        RESULTS.parent.mkdir(exist_ok=True)
        with RESULTS.open("a") as fh:
            fh.write(text + "\n")
        with RESULTS.with_suffix(".json").open("a") as fh:
            fh.write(json.dumps({"time": time.time(), "quick": args.quick, "rows": rows}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
