"""Benchmark: the route calculation and the route writer at scale, in a node namespace (root needed).

    .venv/bin/python bench/routes_writer.py [--sizes 1000,10000]

For N remote blocks (one /26 per remote node, every node a next hop on the underlay subnet) it measures: the pure
plan (`plan_routes`), the first writer pass (N routes added), a no-change verifying pass (what every resync costs,
reading the kernel's tables), an event-driven pass adding one route from the writers' model (what a BGP update
costs, plan excluded), and the pass that removes them all; VXLAN adds N FDB + N neighbour entries. Prints a table
and appends it to bench/results/routes.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.calc.routes import plan_routes
from agent.calc.snapshot import Snapshot
from agent.dataplane.links import LinkWriter
from agent.dataplane.netlink import Netlink
from agent.dataplane.routes import RouteWriter
from bgp.rib import LearnedRoute
from datastore import model as m
from testbed.netns import NetnsBed

RESULTS = Path(__file__).resolve().parent / "results" / "routes.md"


def world(n: int, encapsulation: str) -> tuple[Snapshot, list[LearnedRoute]]:
    """Node "me" at 10.0.0.1/16 and n remote nodes 10.0.x.y, node i owning 10.(64 + i // 1024).… /26 blocks."""
    under = ipaddress.ip_network("10.0.0.0/16")
    pods = ipaddress.ip_network("100.64.0.0/10")
    nodes = {"me": m.Node("me", f"{under.network_address + 1}/16")}
    blocks: dict[str, m.Block] = {}
    learned = []
    for i in range(n):
        ip = str(under.network_address + 2 + i)
        name = f"n{i}"
        nodes[name] = m.Node(name, f"{ip}/16")
        cidr = str(ipaddress.ip_network(f"{pods.network_address + 64 * i}/26"))
        blocks[cidr] = m.Block(cidr, affinity=f"node:{name}")
        learned.append(LearnedRoute(cidr, ip, ip))
    pool = m.IPPool(str(pods), encapsulation=encapsulation)
    snap = Snapshot(in_sync=True, pools={pool.cidr: pool}, nodes=nodes, blocks=blocks)
    return snap, learned


def measure(n: int, encapsulation: str) -> dict[str, float]:
    snap, learned = world(n, encapsulation)
    t = time.perf_counter()
    plan = plan_routes(snap, "me", learned)
    plan_ms = (time.perf_counter() - t) * 1000
    empty = plan_routes(snap, "me", [])
    with NetnsBed() as bed:
        node = bed.netns("bench")
        node.ip("link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
        node.ip("link", "set", "eth0", "up")
        node.ip("link", "set", "peer0", "up")
        node.ip("addr", "add", "10.0.0.1/16", "dev", "eth0")
        nl = Netlink(node.name)
        try:
            links, routes = LinkWriter(nl), RouteWriter(nl)
            nl.names()  # open the namespace handle outside the timings
            t = time.perf_counter()
            assert not links.apply(plan, in_sync=True).problems
            first = routes.apply(plan.routes, in_sync=True)
            add_s = time.perf_counter() - t
            assert not first.failed, list(first.failed.items())[:3]
            t = time.perf_counter()
            links.apply(plan, in_sync=True)
            again = routes.apply(plan.routes, in_sync=True)
            noop_s = time.perf_counter() - t
            assert again.changed == 0
            # An event-driven pass: one more remote block, written from the writers' model (no table reads).
            extra = LearnedRoute("100.127.255.192/26", "10.0.0.2", "10.0.0.2")
            one_more = plan_routes(snap, "me", [*learned, extra])
            t = time.perf_counter()
            links.apply(one_more, in_sync=True, verify=False)
            event = routes.apply(one_more.routes, in_sync=True, verify=False)
            event_s = time.perf_counter() - t
            assert event.changed == 1, event.changed
            t = time.perf_counter()
            links.apply(empty, in_sync=True)
            gone = routes.apply(empty.routes, in_sync=True)
            del_s = time.perf_counter() - t
            assert len(gone.removed) == n + 1, len(gone.removed)
        finally:
            nl.close()
    return {"plan_ms": plan_ms, "add_s": add_s, "noop_s": noop_s, "event_s": event_s, "del_s": del_s}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000")
    args = ap.parse_args()
    rows = []
    for n in [int(x) for x in args.sizes.split(",")]:
        for encapsulation in ("none", "vxlan"):
            r = measure(n, encapsulation)
            rows.append(
                f"| {n} | {encapsulation} | {r['plan_ms']:.1f} | {r['add_s']:.2f} | {r['noop_s']:.3f} | "
                f"{r['event_s'] * 1000:.1f} | {r['del_s']:.2f} |"
            )
            print(rows[-1], flush=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join(
        [
            f"\n## {stamp} — {platform.node()}, kernel {platform.release()}, "
            f"`bench/routes_writer.py --sizes {args.sizes}`\n",
            "| remote blocks | encapsulation | plan (ms) | first pass: add all (s) | no-change verifying pass (s) "
            "| event pass, 1 route added (ms) | remove all (s) |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    RESULTS.parent.mkdir(exist_ok=True)
    if not RESULTS.exists():
        RESULTS.write_text(
            "# Routes: calculation and writer\n\nFigures from `bench/routes_writer.py` (one node namespace, pyroute2, "
            "main table). A no-change pass is what the runner's periodic resync costs.\n"
        )
    with RESULTS.open("a") as fh:
        fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
