"""Benchmark: HTTP QPS and CPU time per request between two pods through their node, with podnet's policy vs
baselines (the seed's test).

    .venv/bin/python bench/policy_qps.py [--sizes 2000,8000,50000] [--ipblocks 12000] [--rounds 15] [--duration 3]
                                         [--backend nft] [--close]

Each variant gets its own node namespace with a client pod (wrk) and a server pod (nginx), wired as podnet's CNI
does, so switching variants never leaves netfilter state behind:

- ``none``: no netfilter at all in the node (no table, no conntrack);
- ``conntrack``: one filter rule with a conntrack match (what every node running kube-proxy already pays);
- ``podnet-N``: the real compiler's output for N pods in one namespace (2 real, N-2 synthetic, 50 of them local,
  the rest on nodes of 100 with their endpoints there) and one policy selecting all of them that allows ingress
  from all of them (an N-member ipset), programmed by the real writers;
- ``linear-N``: the reference the seed measured (kube-router 0.2): one rule per pod in a linear chain, traversed by
  every packet;
- ``podnet-N-twin`` (``--twin``): a second ``podnet-N`` of the smallest N, an A/A control: how much two identical
  setups differ;
- ``cidr-1`` and ``cidr-M`` (``--ipblocks M``): a policy selecting the server whose one ingress peer list is the
  client's /32 alone, or M customer networks (/16 to /32, some with excepts) with the client's /32 last.

Every round runs every variant once, in a shuffled order; a variant's figures are paired with the others' of the
same round. Two figures per run: requests per second (wrk), and CPU time per request — the CPU time of wrk, of
nginx's worker and of the ksoftirqd threads (the packet path, netfilter included, runs in softirq in their
context), from the kernel's precise per-task runtime, divided by the requests. CPU time per request does not count
the time other work on the machine takes from the benchmark, so it is the quieter figure on a shared machine.
Medians over the rounds with a distribution-free 95 % confidence interval (order statistics of the median).

``--close``: every request on a new connection (``Connection: close``), so every request's SYN meets the policy
rules and sets; without it wrk keeps 16 connections open and all but their first packets are ESTABLISHED.

The rule counters of the largest podnet variant tell which packets met an ipset at all. Appends a table to
bench/results/policy.md.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.calc.policy import compile_node
from agent.calc.snapshot import Snapshot
from agent.dataplane.backend import Backend
from agent.dataplane.cmd import CommandRunner
from agent.dataplane.programmer import PolicyDataplane
from bench import netns_lock
from bench.machine import describe
from bench.policy_model import customer_networks, iface, pod_ip
from datastore import model as m
from testbed.netns import NetnsBed, NodeNs, Pod

RESULTS = Path(__file__).resolve().parent / "results" / "policy.md"
NS = "bench"
CLIENT_IP, SERVER_IP, STRANGER_IP = "10.244.0.2", "10.244.0.3", "10.244.0.4"
SYNTHETIC_LOCAL = 50
PER_NODE = 100
# wrk and nginx pinned to different CPUs (each side's packet processing runs where it sends): the scheduler moving
# them around was a large part of the run-to-run spread. Same for every variant.
PIN = (os.cpu_count() or 1) >= 2
CLIENT_CPU = ("taskset", "-c", "0") if PIN else ()
SERVER_CPU = ("taskset", "-c", "1") if PIN else ()

NGINX_CONF = """worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log error;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen {ip}:80;
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


@dataclass
class Setup:
    name: str
    node: NodeNs
    client: Pod
    server: Pod
    stranger: Pod  # in another namespace: podnet's policy refuses it
    nginx: int  # pid of nginx's master


@dataclass
class Run:
    rps: float
    cpu_us: float  # CPU time per request, microseconds


def _pods_and_endpoints(
    node: str, pods: list[Pod]
) -> tuple[dict[tuple[str, str], m.Pod], dict[tuple[str, str, str, str], m.Endpoint]]:
    out_pods: dict[tuple[str, str], m.Pod] = {}
    endpoints: dict[tuple[str, str, str, str], m.Endpoint] = {}
    for pod in pods:
        out_pods[(pod.namespace, pod.name)] = m.Pod(pod.namespace, pod.name, {"app": pod.name}, (pod.ip,), node)
        endpoints[(node, pod.namespace, pod.name, "eth0")] = m.Endpoint(
            node, pod.namespace, pod.name, "eth0", pod.host_iface, (f"{pod.ip}/32",)
        )
    return out_pods, endpoints


def _namespaces() -> dict[str, m.Namespace]:
    return {ns: m.Namespace(ns, {"kubernetes.io/metadata.name": ns}) for ns in (NS, "other")}


def snapshot(n: int, node: str, client: Pod, server: Pod, stranger: Pod) -> Snapshot:
    """N pods in namespace ``bench``: the two real ones and N-2 synthetic ones (50 on this node, the rest on nodes
    of 100, each with its endpoint there); one policy selecting all pods of ``bench``."""
    pods, endpoints = _pods_and_endpoints(node, [client, server, stranger])
    for i in range(n - 2):
        name = f"s{i}"
        host = node if i < SYNTHETIC_LOCAL else f"node{1 + (i - SYNTHETIC_LOCAL) // PER_NODE}"
        pods[(NS, name)] = m.Pod(NS, name, {"app": "synthetic"}, (pod_ip(i),), host)
        endpoints[(host, NS, name, "eth0")] = m.Endpoint(host, NS, name, "eth0", iface(NS, name), (f"{pod_ip(i)}/32",))
    policy = m.Policy(NS, "same-namespace", {"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]})
    return Snapshot(
        revision=1,
        in_sync=True,
        pods=pods,
        namespaces=_namespaces(),
        policies={(NS, "same-namespace"): policy},
        endpoints=endpoints,
    )


def cidr_snapshot(n: int, node: str, client: Pod, server: Pod, stranger: Pod) -> Snapshot:
    """One policy selecting the server, ingress from one peer list: ``n`` - 1 customer networks and the client's
    /32 last (``n`` = 1: the client's /32 alone)."""
    pods, endpoints = _pods_and_endpoints(node, [client, server, stranger])
    peers = customer_networks(n, allow=f"{client.ip}/32") if n > 1 else [{"ipBlock": {"cidr": f"{client.ip}/32"}}]
    spec = {"podSelector": {"matchLabels": {"app": server.name}}, "ingress": [{"from": peers}]}
    return Snapshot(
        revision=1,
        in_sync=True,
        pods=pods,
        namespaces=_namespaces(),
        policies={(NS, "customers"): m.Policy(NS, "customers", spec)},
        endpoints=endpoints,
    )


def linear_rules(n: int) -> str:
    lines = ["*filter", ":podnet-linear - [0:0]"]
    lines += [f"-A podnet-linear -s {pod_ip(i)}/32 -d {SERVER_IP}/32 -j ACCEPT" for i in range(n - 2)]
    lines += [
        f"-A podnet-linear -s {CLIENT_IP}/32 -d {SERVER_IP}/32 -j ACCEPT",
        f"-A podnet-linear -s {SERVER_IP}/32 -d {CLIENT_IP}/32 -j ACCEPT",
        "-A podnet-linear -j DROP",
        "-I FORWARD 1 -j podnet-linear",
        "COMMIT",
    ]
    return "\n".join(lines) + "\n"


def make_setup(bed: NetnsBed, ul: object, name: str, host: int, tmp: Path) -> Setup:
    node = bed.node(name, ul, host)  # type: ignore[arg-type]
    client = bed.pod(node, NS, "client", CLIENT_IP)
    server = bed.pod(node, NS, "server", SERVER_IP)
    stranger = bed.pod(node, "other", "stranger", STRANGER_IP)
    # For --close: the node forgets closed connections after 1 s instead of 120 s (the conntrack table's limit is
    # machine-wide), and the client may reuse ports still in TIME_WAIT.
    node.ns.run("sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_timeout_time_wait=1", check=False)
    client.ns.sysctl("net.ipv4.tcp_tw_reuse", "1")
    d = tmp / name
    d.mkdir()
    (d / "nginx.conf").write_text(NGINX_CONF.format(dir=d, ip=SERVER_IP))
    proc = server.ns.popen(*SERVER_CPU, "nginx", "-c", str(d / "nginx.conf"), "-p", str(d))
    return Setup(name, node, client, server, stranger, proc.pid)


def _runtime_ns(pid: int) -> int:
    """The task's precise CPU time (the scheduler's sum_exec_runtime), softirq work done in its context included."""
    with open(f"/proc/{pid}/schedstat") as fh:
        return int(fh.read().split()[0])


def _ksoftirqd() -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/comm") as fh:
                    if fh.read().startswith("ksoftirqd/"):
                        out.append(int(d))
            except OSError:
                continue
    return out


KSOFTIRQD = _ksoftirqd()


def _workers(master: int) -> list[int]:
    with open(f"/proc/{master}/task/{master}/children") as fh:
        return [int(x) for x in fh.read().split()]


def wrk(setup: Setup, seconds: float, close: bool = False) -> Run:
    """One wrk run; requests per second and CPU time per request (wrk + nginx worker + ksoftirqd)."""
    tasks = [*_workers(setup.nginx), *KSOFTIRQD]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = sum(_runtime_ns(t) for t in tasks)
    header = ("-H", "Connection: close") if close else ()
    cmd = ["ip", "netns", "exec", setup.client.ns.name, *CLIENT_CPU, "wrk", "-t1", "-c16", f"-d{round(seconds)}s"]
    out = subprocess.run(
        [*cmd, *header, f"http://{SERVER_IP}/"], capture_output=True, text=True, timeout=seconds + 30, check=False
    ).stdout
    t1 = sum(_runtime_ns(t) for t in tasks)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if rps is None or total is None or "Non-2xx" in out or ("Socket errors" in out and not close):
        raise RuntimeError(f"wrk in {setup.name} failed: {out}")
    wrk_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return Run(float(rps.group(1)), (wrk_s + (t1 - t0) / 1e9) / int(total.group(1)) * 1e6)


def wait_http(setup: Setup) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if setup.client.ns.run("wrk", "-t1", "-c1", "-d1s", f"http://{SERVER_IP}/", check=False).returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"nginx in {setup.name} does not answer")


def tcp_open(pod: Pod) -> bool:
    code = f"import socket; socket.create_connection(('{SERVER_IP}', 80), timeout=0.5).close()"
    return pod.ns.run(sys.executable, "-c", code, check=False).returncode == 0


def median_ci(values: list[float]) -> tuple[float, float, float]:
    """Median and a distribution-free ~95 % confidence interval for it: the order statistics j and n+1-j with
    P(Binomial(n, 1/2) < j) <= 2.5 % (the whole range when n < 6)."""
    s = sorted(values)
    n = len(s)
    j, acc = 0, 0.0
    while acc + math.comb(n, j) / 2**n <= 0.025:
        acc += math.comb(n, j) / 2**n
        j += 1
    j = max(j, 1)
    return statistics.median(s), s[j - 1], s[n - j]


def ci(values: list[float]) -> str:
    med, lo, hi = median_ci(values)
    return f"{med:.3f} [{lo:.3f}-{hi:.3f}]"


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def set_counters(runner: CommandRunner, backend: Backend) -> tuple[int, int]:
    """Packets accepted by the ESTABLISHED rule of podnet-FORWARD, and packets that met any rule matching an
    ipset (each counted at every such rule it met)."""
    text = runner.run([f"iptables-{backend.name}-save", "-c", "-t", "filter"]).stdout
    est = sets = 0
    for line in text.splitlines():
        mt = re.match(r"\[(\d+):\d+\] -A (\S+) (.*)", line)
        if mt is None:
            continue
        pkts, chain, rule = int(mt.group(1)), mt.group(2), mt.group(3)
        if chain == "podnet-FORWARD" and "ESTABLISHED" in rule:
            est += pkts
        if "--match-set" in rule:
            sets += pkts
    return est, sets


def program(name: str, s: Setup, backend: Backend) -> None:
    runner = CommandRunner(s.node.ns.name)
    if name == "conntrack":
        runner.run([backend.iptables, "-A", "FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"])
    elif name.startswith(("podnet-", "cidr-")):
        n = int(name.split("-")[1])
        make = snapshot if name.startswith("podnet-") else cidr_snapshot
        state = compile_node(make(n, s.node.name, s.client, s.server, s.stranger), s.node.name).state
        PolicyDataplane(runner, backend).apply(state)
        members = max((len(x.members) for x in state.ipsets.values()), default=0)
        rules = sum(len(c.rules) for c in state.tables["filter"].values())
        print(f"{name}: {rules} rules, {len(state.ipsets)} ipsets, largest {members} members", flush=True)
    elif name.startswith("linear-"):
        runner.run([f"iptables-{backend.name}-restore", "--noflush"], stdin=linear_rules(int(name.split("-")[1])))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="2000,8000,50000")
    ap.add_argument("--ipblocks", type=int, default=12000, help="CIDRs of the cidr-M variant (0: no cidr variants)")
    ap.add_argument("--no-linear", action="store_true", help="leave out the linear per-pod reference")
    ap.add_argument(
        "--twin", action="store_true", help="a second, identical podnet variant of the smallest size (an A/A control)"
    )
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--duration", type=int, default=3)
    ap.add_argument("--backend", default="nft", choices=["nft", "legacy"])
    ap.add_argument("--close", action="store_true", help="a new connection per request")
    ap.add_argument("--note", default="", help="a word for the results header (e.g. before / after a change)")
    ap.add_argument("--no-write", action="store_true", help="print only, do not append to the results file")
    args = ap.parse_args()
    lock = netns_lock.hold()  # noqa: F841 - held until the process exits
    sizes = [int(x) for x in args.sizes.split(",")]
    backend = Backend(args.backend)
    load_before = os.getloadavg()[0]
    git = subprocess.run(["git", "log", "-1", "--format=%h %s"], capture_output=True, text=True, check=False)
    head = os.environ.get("BENCH_HEAD") or git.stdout.strip()[:90]
    names = ["none", "conntrack"] + [f"podnet-{n}" for n in sizes]
    if args.twin:
        names.append(f"podnet-{sizes[0]}-twin")
    if not args.no_linear:
        names += [f"linear-{n}" for n in sizes]
    if args.ipblocks:
        names += ["cidr-1", f"cidr-{args.ipblocks}"]
    runs: dict[str, list[Run]] = {name: [] for name in names}

    with NetnsBed() as bed, tempfile.TemporaryDirectory(prefix="podnet-qps-") as tmpdir:
        ul = bed.underlay()
        setups = {name: make_setup(bed, ul, f"v{i}", 11 + i, Path(tmpdir)) for i, name in enumerate(names)}
        programming: dict[str, float] = {}
        for name, s in setups.items():
            t = time.perf_counter()
            program(name, s, backend)
            programming[name] = time.perf_counter() - t
        for s in setups.values():
            wait_http(s)
        # The policy must be in force, not bypassed: a pod of another namespace is refused where a policy rules.
        for name, s in setups.items():
            assert tcp_open(s.client), f"{name}: client cannot reach the server"
            refused = not tcp_open(s.stranger)
            assert refused == name.startswith(("podnet-", "linear-", "cidr-")), f"{name}: policy not as expected"
        rnd = random.Random(1)
        for r in range(args.rounds):
            order = list(names)
            rnd.shuffle(order)
            for name in order:
                runs[name].append(wrk(setups[name], args.duration, args.close))
            print(
                f"round {r + 1}: "
                + ", ".join(f"{n} {runs[n][-1].rps:.0f}/s {runs[n][-1].cpu_us:.1f}us" for n in names),
                flush=True,
            )
        biggest = f"podnet-{sizes[-1]}"
        est, via_sets = set_counters(CommandRunner(setups[biggest].node.ns.name), backend)

    def rps_ratio(a: str, b: str) -> list[float]:
        return [x.rps / y.rps for x, y in zip(runs[a], runs[b], strict=True)]

    def cpu_ratio(a: str, b: str) -> list[float]:
        return [x.cpu_us / y.cpu_us for x, y in zip(runs[a], runs[b], strict=True)]

    stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    note = f", {args.note}" if args.note else ""
    mode = "a new connection per request" if args.close else "16 keep-alive connections"
    lines = [
        f"### QPS and CPU per request with policy, {stamp} UTC{note} (iptables-{backend.name}, nginx + wrk -t1 -c16, "
        f"{mode}{', pinned to CPUs 1 / 0' if PIN else ''}, {args.duration:g} s runs, {args.rounds} rounds of every "
        "variant in shuffled order; median [95 % CI] of ratios paired within a round)",
        "",
        f"{describe(load_before)}; head `{head}`.",
        "",
        "| variant | req/s | CPU µs / request | req/s ÷ conntrack-only | CPU / request ÷ conntrack-only "
        "| req/s ÷ no netfilter |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        lines.append(
            f"| {name} | {statistics.median(x.rps for x in runs[name]):.0f} "
            f"| {statistics.median(x.cpu_us for x in runs[name]):.2f} "
            f"| {ci(rps_ratio(name, 'conntrack'))} | {ci(cpu_ratio(name, 'conntrack'))} "
            f"| {ci(rps_ratio(name, 'none'))} |"
        )
    small = f"podnet-{sizes[0]}"
    lines += [
        "",
        f"Growth with N: {biggest} ÷ {small}: req/s {ci(rps_ratio(biggest, small))}, "
        f"CPU per request {ci(cpu_ratio(biggest, small))}.",
    ]
    if args.twin:
        lines.append(
            f"A/A control (two identical {small} setups): req/s {ci(rps_ratio(small + '-twin', small))}, "
            f"CPU per request {ci(cpu_ratio(small + '-twin', small))}."
        )
    if args.ipblocks:
        big = f"cidr-{args.ipblocks}"
        lines.append(
            f"ipBlocks: {big} ÷ cidr-1: req/s {ci(rps_ratio(big, 'cidr-1'))}, "
            f"CPU per request {ci(cpu_ratio(big, 'cidr-1'))}."
        )
    lines += [
        f"Rule counters in {biggest} after all rounds: {est} packets accepted by podnet-FORWARD's ESTABLISHED rule, "
        f"{via_sets} packet-rule evaluations at rules that match an ipset.",
        "",
        "compile + program time: " + ", ".join(f"{k} {v:.2f} s" for k, v in programming.items() if v > 0.005),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        RESULTS.parent.mkdir(exist_ok=True)
        with RESULTS.open("a") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
