"""Benchmark: does the per-request cost grow with the pods in the model? One node, two sizes, swapped in place.

    .venv/bin/python bench/policy_qps_swap.py [--sizes 2000,50000] [--rounds 20] [--duration 3] [--backend nft]
                                              [--close]

policy_qps.py compares sizes across separate node namespaces, and two identical setups there differ by a few
percent on their own (its ``--twin`` control). Here one node namespace, one client and one server serve every
size: before each run the real writers reprogram the node from the compiler's state for that size (the same
rules; only the membership of the policy's ipset changes), so the runs differ in N and nothing else. Sizes
alternate (ABAB…, the order flipped every round); the figures are requests per second and CPU time per request
(see policy_qps.py), as ratios to the first size paired within a round, median [95 % CI]. Appends to
bench/results/policy.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.calc.policy import compile_node
from agent.dataplane.backend import Backend
from agent.dataplane.cmd import CommandRunner
from agent.dataplane.programmer import PolicyDataplane
from bench import netns_lock
from bench.machine import describe
from bench.policy_qps import PIN, RESULTS, Run, ci, make_setup, snapshot, tcp_open, wait_http, wrk
from testbed.netns import NetnsBed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="2000,50000")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--duration", type=int, default=3)
    ap.add_argument("--backend", default="nft", choices=["nft", "legacy"])
    ap.add_argument("--close", action="store_true", help="a new connection per request")
    ap.add_argument("--note", default="")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    lock = netns_lock.hold()  # noqa: F841 - held until the process exits
    sizes = [int(x) for x in args.sizes.split(",")]
    backend = Backend(args.backend)
    load_before = os.getloadavg()[0]
    git = subprocess.run(["git", "log", "-1", "--format=%h %s"], capture_output=True, text=True, check=False)
    head = os.environ.get("BENCH_HEAD") or git.stdout.strip()[:90]
    runs: dict[int, list[Run]] = {n: [] for n in sizes}
    with NetnsBed() as bed, tempfile.TemporaryDirectory(prefix="podnet-qps-") as tmpdir:
        s = make_setup(bed, bed.underlay(), "swap", 11, Path(tmpdir))
        dataplane = PolicyDataplane(CommandRunner(s.node.ns.name), backend)
        states = {
            n: compile_node(snapshot(n, s.node.name, s.client, s.server, s.stranger), s.node.name).state for n in sizes
        }
        dataplane.apply(states[sizes[0]])
        wait_http(s)
        assert tcp_open(s.client) and not tcp_open(s.stranger), "the policy is not in force"
        for r in range(args.rounds):
            for n in sizes if r % 2 == 0 else sizes[::-1]:
                dataplane.apply(states[n])
                time.sleep(0.5)  # let the writer's processes go before measuring
                runs[n].append(wrk(s, args.duration, args.close))
            print(
                f"round {r + 1}: "
                + ", ".join(f"{n} {runs[n][-1].rps:.0f}/s {runs[n][-1].cpu_us:.2f}us" for n in sizes),
                flush=True,
            )
        dataplane.remove_all()

    base = sizes[0]
    stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    note = f", {args.note}" if args.note else ""
    mode = "a new connection per request" if args.close else "16 keep-alive connections"
    lines = [
        f"### Per-request cost vs N, sizes swapped in one node, {stamp} UTC{note} (iptables-{backend.name}, nginx + "
        f"wrk -t1 -c16, {mode}{', pinned to CPUs 1 / 0' if PIN else ''}, {args.duration:g} s runs, {args.rounds} "
        "rounds; median [95 % CI] of ratios paired within a round)",
        "",
        f"{describe(load_before)}; head `{head}`.",
        "",
        f"| pods in model | req/s | CPU µs / request | req/s ÷ {base} pods | CPU / request ÷ {base} pods |",
        "|---|---|---|---|---|",
    ]
    for n in sizes:
        rps = [a.rps / b.rps for a, b in zip(runs[n], runs[base], strict=True)]
        cpu = [a.cpu_us / b.cpu_us for a, b in zip(runs[n], runs[base], strict=True)]
        med_rps = sorted(x.rps for x in runs[n])[len(runs[n]) // 2]
        med_cpu = sorted(x.cpu_us for x in runs[n])[len(runs[n]) // 2]
        lines.append(f"| {n} | {med_rps:.0f} | {med_cpu:.2f} | {ci(rps)} | {ci(cpu)} |")
    text = "\n".join([*lines, ""])
    print(text)
    if not args.no_write:
        with RESULTS.open("a") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
