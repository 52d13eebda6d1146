"""Benchmark: the pure policy compiler alone (no etcd, no kernel) — cold compile and one change, fresh vs
incremental.

    .venv/bin/python bench/policy_compile.py [--sizes 2000:200,10000:1000,50000:1000] [--changes 40]

For each size (pods:policies; bench/policy_model.py, 100 pods local to the node) it measures a fresh compile
(``compile_node`` without a compiler: what ``agentctl`` does) and, with one ``PolicyCompiler`` kept across
snapshots (what the agent should do), the time from a snapshot with one change (alternately a local pod relabelled
and one policy's port edited) to the node's DataplaneState, p50 and p99. Appends a table to
bench/results/policy_compile.md.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.calc.policy import PolicyCompiler, compile_node
from agent.calc.snapshot import Snapshot
from bench.policy_model import synthetic
from datastore import model as m

RESULTS = Path(__file__).resolve().parent / "results" / "policy_compile.md"
NODE = "n1"


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def snapshot_of(pods: int, policies: int) -> Snapshot:
    c = synthetic(pods, policies, NODE, 100)
    return Snapshot(
        revision=1,
        in_sync=True,
        nodes={NODE: m.Node(NODE, "192.168.77.11/24")},
        pods={(p.namespace, p.name): p for p in c.pods},
        namespaces={n.name: n for n in c.namespaces},
        policies={(p.namespace, p.name): p for p in c.policies},
        endpoints={(e.node, e.namespace, e.pod, e.iface): e for e in c.endpoints},
    )


def run(pods: int, policies: int, changes: int) -> dict[str, float]:
    snap = snapshot_of(pods, policies)
    fresh = []
    for _ in range(3):
        t = time.perf_counter()
        compile_node(snap, NODE)
        fresh.append(time.perf_counter() - t)
    compiler = PolicyCompiler()
    t = time.perf_counter()
    compile_node(snap, NODE, compiler)
    first = time.perf_counter() - t
    local = sorted(k for k, p in snap.pods.items() if p.node == NODE)
    port_policies = sorted(k for k, p in snap.policies.items() if re.search(r'"port": \d', json.dumps(p.spec)))
    lat = []
    for i in range(changes):
        pods_map, pols = dict(snap.pods), dict(snap.policies)
        if i % 2 == 0:
            k = local[(i // 2) % len(local)]
            p = pods_map[k]
            pods_map[k] = replace(
                p, labels={**p.labels, "app": "relabelled" if p.labels.get("app") != "relabelled" else "web"}
            )
        else:
            k = port_policies[(i // 2) % len(port_policies)]
            text = re.sub(
                r'"port": (\d+)', lambda mt: f'"port": {int(mt.group(1)) ^ 1}', json.dumps(pols[k].spec), count=1
            )
            pols[k] = replace(pols[k], spec=json.loads(text))
        snap = replace(snap, pods=pods_map, policies=pols, revision=snap.revision + 1)
        t = time.perf_counter()
        compile_node(snap, NODE, compiler)
        lat.append(time.perf_counter() - t)
    return {
        "fresh_ms": statistics.median(fresh) * 1000,
        "first_ms": first * 1000,
        "p50_ms": pct(lat, 0.5) * 1000,
        "p99_ms": pct(lat, 0.99) * 1000,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="2000:200,10000:1000,50000:1000")
    ap.add_argument("--changes", type=int, default=40)
    args = ap.parse_args()
    rows = []
    for size in args.sizes.split(","):
        pods, policies = (int(x) for x in size.split(":"))
        r = run(pods, policies, args.changes)
        cells = [
            pods,
            policies,
            f"{r['fresh_ms']:.0f}",
            f"{r['first_ms']:.0f}",
            f"{r['p50_ms']:.1f}",
            f"{r['p99_ms']:.1f}",
        ]
        line = "| " + " | ".join(str(c) for c in cells) + " |"
        print(line, flush=True)
        rows.append(line)
    header = (
        f"\n## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} — `bench/policy_compile.py --sizes {args.sizes} "
        f"--changes {args.changes}`\n\n"
        "| pods | policies | fresh compile ms (median of 3) | incremental first ms | one change p50 ms | p99 ms |\n"
        "|---|---|---|---|---|---|\n"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as fh:
        if RESULTS.stat().st_size == 0:
            fh.write("# Policy compiler (pure): cold compile and one change\n")
        fh.write(header + "\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
