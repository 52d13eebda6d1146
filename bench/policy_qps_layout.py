"""Benchmark: where podnet's per-request cost over conntrack-only goes (a companion of policy_qps.py).

    .venv/bin/python bench/policy_qps_layout.py [--pods 2000] [--rounds 6] [--duration 3] [--backend nft]

Same path and load as policy_qps.py (client pod → node → server pod, nginx + wrk), five node variants:

- ``conntrack``: one filter rule with a conntrack match (the baseline);
- ``jump``: a jump from FORWARD to one chain that accepts RELATED,ESTABLISHED first (the least a policy engine that
  jumps to its own chain can do), no comments;
- ``jump+hash``: the same with podnet's per-rule hash comments (iptables-nft evaluates each comment as a match per
  packet: why the compiler's hot chains carry none);
- ``compiled``: the compiler's real ruleset for N pods and one policy selecting all of them (it accepts
  RELATED,ESTABLISHED of pod interfaces in podnet-FORWARD's first rules);
- ``compiled+est``: the same with an unrestricted RELATED,ESTABLISHED accept before those.

Interleaved rounds (order flipped every other round), ratios to conntrack paired within a round, median (min-max).
Appends a table to bench/results/policy.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.calc.policy import compile_node
from agent.calc.state import Chain
from agent.dataplane.backend import Backend
from agent.dataplane.cmd import CommandRunner
from agent.dataplane.programmer import PolicyDataplane
from bench import netns_lock
from bench.policy_qps import RESULTS, make_setup, snapshot, spread, tcp_open, wait_http, wrk
from testbed.netns import NetnsBed

EST = "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"


def minimal_chain(comments: bool) -> str:
    c = (lambda h: f'-m comment --comment "podnet:{h}" ') if comments else (lambda h: "")
    jump = "-m comment --comment podnet " if comments else ""
    return (
        "*filter\n:podnet-F - [0:0]\n"
        f"-A podnet-F {c('0a01')}{EST}\n"
        f"-A podnet-F {c('0a02')}-m conntrack --ctstate INVALID -j DROP\n"
        f"-I FORWARD 1 {jump}-j podnet-F\nCOMMIT\n"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pods", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--duration", type=int, default=3)
    ap.add_argument("--backend", default="nft", choices=["nft", "legacy"])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    lock = netns_lock.hold()  # noqa: F841 - held until the process exits
    backend = Backend(args.backend)
    load_before = os.getloadavg()[0]
    names = ["conntrack", "jump", "jump+hash", "compiled", "compiled+est"]
    ratios: dict[str, list[float]] = {n: [] for n in names[1:]}
    base: list[float] = []
    with NetnsBed() as bed, tempfile.TemporaryDirectory(prefix="podnet-qps-") as tmpdir:
        ul = bed.underlay()
        setups = {n: make_setup(bed, ul, f"v{i}", 11 + i, Path(tmpdir)) for i, n in enumerate(names)}
        for name, s in setups.items():
            runner = CommandRunner(s.node.ns.name)
            restore = [f"iptables-{backend.name}-restore", "--noflush"]
            if name == "conntrack":
                runner.run([backend.iptables, "-A", "FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"])
            elif name.startswith("jump"):
                runner.run(restore, stdin=minimal_chain(comments=name == "jump+hash"))
            else:
                state = compile_node(
                    snapshot(args.pods, s.node.name, s.client, s.server, s.stranger), s.node.name
                ).state
                if name == "compiled+est":
                    top = state.tables["filter"]["podnet-FORWARD"]
                    state.tables["filter"]["podnet-FORWARD"] = Chain(top.name, (EST, *top.rules))
                PolicyDataplane(runner, backend).apply(state)
                assert not tcp_open(s.stranger), f"{name}: the policy is not in force"
        for s in setups.values():
            wait_http(s)
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            got = {n: wrk(setups[n], args.duration).rps for n in order}
            base.append(got["conntrack"])
            for n in names[1:]:
                ratios[n].append(got[n] / got["conntrack"])
            print(f"round {r + 1}: " + ", ".join(f"{n} {got[n]:.0f}" for n in names), flush=True)

    stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    lines = [
        f"### Where the per-request cost goes, {stamp} UTC (iptables-{backend.name}, {args.pods} pods, "
        f"{args.rounds} rounds of {args.duration} s; ratio to conntrack-only, median (min-max))",
        "",
        f"{os.cpu_count()} CPUs, 1-min load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after; "
        f"conntrack-only median {statistics.median(base):.0f} req/s.",
        "",
        "| jump + ESTABLISHED first | same with hash comments | compiled ruleset | compiled, ESTABLISHED first |",
        "|---|---|---|---|",
        "| " + " | ".join(spread(ratios[n]) for n in names[1:]) + " |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        with RESULTS.open("a") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
