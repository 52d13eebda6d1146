"""Benchmark: HTTP QPS between two pods through their node, with podnet's policy vs baselines (the seed's test).

    .venv/bin/python bench/policy_qps.py [--sizes 2000,8000,50000] [--rounds 5] [--duration 3] [--backend nft]

Each variant gets its own node namespace with a client pod (wrk) and a server pod (nginx), wired as podnet's CNI
does, so switching variants never leaves netfilter state behind:

- ``none``: no netfilter at all in the node (no table, no conntrack);
- ``conntrack``: one filter rule with a conntrack match (what every node running kube-proxy already pays);
- ``podnet-N``: the real compiler's output for N pods in one namespace (2 real, N-2 synthetic, 50 of them local with
  endpoints) and one policy selecting all of them that allows ingress from all of them (an N-member ipset),
  programmed by the real writers;
- ``linear-N``: the reference the seed measured (kube-router 0.2): one rule per pod in a linear chain, traversed by
  every packet.

Runs are interleaved: in each round, for each size, conntrack-only, podnet-N, no netfilter and linear-N run back to
back (order flipped every other round), and the ratios pair runs of one such block; the median over rounds is
reported with its spread (min-max). Appends a table to bench/results/policy.md.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.calc.policy import compile_node
from agent.calc.snapshot import Snapshot
from agent.dataplane.backend import Backend
from agent.dataplane.cmd import Runner
from agent.dataplane.programmer import PolicyDataplane
from bench import netns_lock
from bench.policy_model import iface, pod_ip
from datastore import model as m
from testbed.netns import NetnsBed, Node, Pod

RESULTS = Path(__file__).resolve().parent / "results" / "policy.md"
NS = "bench"
CLIENT_IP, SERVER_IP, STRANGER_IP = "10.244.0.2", "10.244.0.3", "10.244.0.4"
SYNTHETIC_LOCAL = 50
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
    node: Node
    client: Pod
    server: Pod
    stranger: Pod  # in another namespace: podnet's policy refuses it


def snapshot(n: int, node: str, client: Pod, server: Pod, stranger: Pod) -> Snapshot:
    """N pods in namespace ``bench``: the two real ones and N-2 synthetic ones; one policy selecting all pods."""
    pods: dict[tuple[str, str], m.Pod] = {}
    endpoints: dict[tuple[str, str, str, str], m.Endpoint] = {}
    for pod in (client, server):
        pods[(NS, pod.name)] = m.Pod(NS, pod.name, {"app": pod.name}, (pod.ip,), node)
        endpoints[(node, NS, pod.name, "eth0")] = m.Endpoint(
            node, NS, pod.name, "eth0", pod.host_iface, (f"{pod.ip}/32",)
        )
    for i in range(n - 2):
        name = f"s{i}"
        host = node if i < SYNTHETIC_LOCAL else f"node{i % 50}"
        pods[(NS, name)] = m.Pod(NS, name, {"app": "synthetic"}, (pod_ip(i),), host)
        if host == node:
            endpoints[(node, NS, name, "eth0")] = m.Endpoint(
                node, NS, name, "eth0", iface(NS, name), (f"{pod_ip(i)}/32",)
            )
    pods[("other", stranger.name)] = m.Pod("other", stranger.name, {}, (stranger.ip,), node)
    endpoints[(node, "other", stranger.name, "eth0")] = m.Endpoint(
        node, "other", stranger.name, "eth0", stranger.host_iface, (f"{stranger.ip}/32",)
    )
    policy = m.Policy(NS, "same-namespace", {"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]})
    return Snapshot(
        revision=1,
        in_sync=True,
        pods=pods,
        namespaces={ns: m.Namespace(ns, {"kubernetes.io/metadata.name": ns}) for ns in (NS, "other")},
        policies={(NS, "same-namespace"): policy},
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
    d = tmp / name
    d.mkdir()
    (d / "nginx.conf").write_text(NGINX_CONF.format(dir=d, ip=SERVER_IP))
    server.ns.popen(*SERVER_CPU, "nginx", "-c", str(d / "nginx.conf"), "-p", str(d))
    return Setup(name, node, client, server, stranger)


def wrk(setup: Setup, seconds: float) -> float:
    out = setup.client.ns.run(
        *CLIENT_CPU, "wrk", "-t1", "-c16", f"-d{round(seconds)}s", f"http://{SERVER_IP}/", timeout=seconds + 30
    ).stdout
    m_ = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m_ is None or "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk in {setup.name} failed: {out}")
    return float(m_.group(1))


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


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="2000,8000,50000")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--duration", type=int, default=3)
    ap.add_argument("--backend", default="nft", choices=["nft", "legacy"])
    ap.add_argument("--no-write", action="store_true", help="print only, do not append to the results file")
    args = ap.parse_args()
    lock = netns_lock.hold()  # noqa: F841 - held until the process exits
    sizes = [int(s) for s in args.sizes.split(",")]
    backend = Backend(args.backend)
    load_before = os.getloadavg()[0]

    with NetnsBed() as bed, tempfile.TemporaryDirectory(prefix="podnet-qps-") as tmpdir:
        tmp = Path(tmpdir)
        ul = bed.underlay()
        setups: dict[str, Setup] = {}
        names = ["none", "conntrack"] + [f"{kind}-{n}" for n in sizes for kind in ("podnet", "linear")]
        for i, name in enumerate(names):
            setups[name] = make_setup(bed, ul, name.replace("podnet", "pn").replace("linear", "ln"), 11 + i, tmp)
        programming: dict[str, float] = {}
        for name, s in setups.items():
            runner = Runner(s.node.ns.name)
            t = time.perf_counter()
            if name == "conntrack":
                runner.run(
                    [
                        f"iptables-{backend.name}",
                        "-A",
                        "FORWARD",
                        "-m",
                        "conntrack",
                        "--ctstate",
                        "INVALID",
                        "-j",
                        "DROP",
                    ]
                )
            elif name.startswith("podnet-"):
                n = int(name.split("-")[1])
                state = compile_node(snapshot(n, s.node.name, s.client, s.server, s.stranger), s.node.name).state
                PolicyDataplane(runner, backend).apply(state)
                members = max(len(x.members) for x in state.ipsets.values())
                rules = sum(len(c.rules) for c in state.tables["filter"].values())
                print(f"{name}: {rules} rules, largest ipset {members} members", flush=True)
            elif name.startswith("linear-"):
                runner.run(
                    [f"iptables-{backend.name}-restore", "--noflush"], stdin=linear_rules(int(name.split("-")[1]))
                )
            programming[name] = time.perf_counter() - t
        for s in setups.values():
            wait_http(s)
        # The policy must be in force, not bypassed: a pod of another namespace is refused where a policy rules.
        for name, s in setups.items():
            assert tcp_open(s.client), f"{name}: client cannot reach the server"
            refused = not tcp_open(s.stranger)
            assert refused == name.startswith(("podnet-", "linear-")), f"{name}: policy not as expected"
        # One block per size and round: conntrack-only, podnet, no netfilter and linear back to back, so each ratio
        # pairs runs seconds apart; the order flips every round so neither side of a pair always runs first.
        blocks: dict[int, list[dict[str, float]]] = {n: [] for n in sizes}
        for r in range(args.rounds):
            for n in sizes if r % 2 == 0 else reversed(sizes):
                kinds = ["conntrack", "podnet", "none", "linear"]
                if r % 2:
                    kinds.reverse()
                block = {}
                for kind in kinds:
                    block[kind] = wrk(setups[kind if kind in ("none", "conntrack") else f"{kind}-{n}"], args.duration)
                blocks[n].append(block)
                print(f"round {r + 1}, {n} pods: " + ", ".join(f"{k} {v:.0f}" for k, v in block.items()), flush=True)

    def ratios(n: int, a: str, b: str) -> list[float]:
        return [blk[a] / blk[b] for blk in blocks[n]]

    rows = [
        (
            n,
            spread(ratios(n, "podnet", "conntrack")),
            spread(ratios(n, "podnet", "none")),
            spread(ratios(n, "linear", "none")),
            spread(ratios(n, "linear", "conntrack")),
            statistics.median(blk["podnet"] for blk in blocks[n]),
        )
        for n in sizes
    ]
    pn_small = ratios(sizes[0], "podnet", "conntrack")
    pn_big = ratios(sizes[-1], "podnet", "conntrack")
    drift = [b / a for a, b in zip(pn_small, pn_big, strict=True)]
    all_blocks = [blk for n in sizes for blk in blocks[n]]
    ct_vs_none = [blk["conntrack"] / blk["none"] for blk in all_blocks]
    stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    lines = [
        f"### QPS with policy, {stamp} UTC (iptables-{backend.name}, nginx + wrk -t1 -c16"
        f"{' pinned to CPUs 1 / 0' if PIN else ''}, "
        f"{args.duration:g} s runs, "
        f"{args.rounds} interleaved rounds; median (min-max) of ratios paired within a round)",
        "",
        f"{os.cpu_count()} CPUs, 1-min load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after "
        "(other work on the machine shows as spread).",
        "",
        f"no netfilter: median {statistics.median(b['none'] for b in all_blocks):.0f} req/s; conntrack only: "
        f"{statistics.median(b['conntrack'] for b in all_blocks):.0f} req/s ({spread(ct_vs_none)} of no netfilter)",
        "",
        "| pods in model | podnet / conntrack-only | podnet / no netfilter | linear per-pod / no netfilter "
        "| linear / conntrack-only | podnet req/s |",
        "|---|---|---|---|---|---|",
        *(f"| {n} | {a} | {b} | {c} | {d} | {q:.0f} |" for n, a, b, c, d, q in rows),
        "",
        f"podnet at {sizes[-1]} pods vs at {sizes[0]} pods (each vs conntrack-only, paired by round): {spread(drift)}",
        "",
        "compile + program time: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in programming.items() if k.startswith(("podnet", "linear"))),
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
