"""Benchmark: the policy compiler alone (no etcd, no kernel) — cold compile and one change, fresh vs incremental.

    .venv/bin/python bench/policy_compile.py [--sizes 2000:200,10000:1000,50000:1000] [--changes 60]

For each size (pods:policies; bench/policy_model.py: 100 pods per node, every pod with its endpoint on its own
node, node records and blocks) the cluster is fed into the agent's real cache (``agent.cache.Cache``, through its
watchers' sinks, as the datastore watcher would), and snapshots are taken from it as the agent takes them. It
measures a fresh compile (``compile_node`` without a compiler: what ``agentctl`` does) and, with one
``PolicyCompiler`` kept across snapshots (what the agent does), one change → the node's DataplaneState: in turn a
local pod relabelled, one policy's port edited, a pod of another node relabelled; p50 / p99 / max of the compile
alone and of snapshot + compile, and p50 per kind. Appends a table to bench/results/policy_compile.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.cache import Cache
from agent.calc.policy import PolicyCompiler, compile_node
from bench.machine import describe
from bench.policy_model import synthetic
from datastore import codec
from datastore.etcd import EtcdClient
from datastore.watcher import InSync, Updated

RESULTS = Path(__file__).resolve().parent / "results" / "policy_compile.md"
NODE = "n1"
KINDS = ("local pod", "policy", "remote pod")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


class Feeder:
    """Hands objects to a Cache the way its watchers do, one revision each, without an etcd."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        self.revision = 0

    def put(self, obj: codec.Model) -> None:
        key = codec.key_of(obj)
        self.revision += 1
        for w in self.cache.watchers:
            if key.path.startswith(w.prefix):
                w.sink(Updated(key, key.path, obj, self.revision))
                return
        raise KeyError(key.path)

    def in_sync(self) -> None:
        for w in self.cache.watchers:
            w.sink(InSync(self.revision))


def run(pods: int, policies: int, changes: int) -> dict[str, float]:
    cluster = synthetic(pods, policies, NODE, 100)
    # The client is never used (the watchers are not started): the cache is fed through their sinks.
    cache = Cache(EtcdClient(["127.0.0.1:1"]))
    feed = Feeder(cache)
    for obj in cluster.objects():
        feed.put(obj)
    feed.in_sync()
    snap = cache.snapshot()
    fresh = []
    for _ in range(3):
        t = time.perf_counter()
        compile_node(snap, NODE)
        fresh.append(time.perf_counter() - t)
    compiler = PolicyCompiler()
    t = time.perf_counter()
    compile_node(snap, NODE, compiler)
    first = time.perf_counter() - t
    pods_now = {(p.namespace, p.name): p for p in cluster.pods}
    local = sorted(k for k, p in pods_now.items() if p.node == NODE)
    remote = sorted(k for k, p in pods_now.items() if p.node != NODE) or local
    pols = {(p.namespace, p.name): p for p in cluster.policies}
    port_policies = sorted(k for k, p in pols.items() if re.search(r'"port": \d', json.dumps(p.spec)))
    comp: list[float] = []
    total: list[float] = []
    kinds: list[str] = []
    for i in range(changes):
        kind = KINDS[i % 3]
        obj: codec.Model
        if kind == "policy":
            k = port_policies[(i // 3) % len(port_policies)]
            text = re.sub(
                r'"port": (\d+)', lambda mt: f'"port": {int(mt.group(1)) ^ 1}', json.dumps(pols[k].spec), count=1
            )
            obj = pols[k] = replace(pols[k], spec=json.loads(text))
        else:
            keys = local if kind == "local pod" else remote
            k = keys[(i * 7919) % len(keys)]
            p = pods_now[k]
            labels = {**p.labels, "app": "relabelled" if p.labels.get("app") != "relabelled" else "web"}
            obj = pods_now[k] = replace(p, labels=labels)
        feed.put(obj)
        t0 = time.perf_counter()
        snap = cache.snapshot()
        t1 = time.perf_counter()
        compile_node(snap, NODE, compiler)
        t2 = time.perf_counter()
        comp.append(t2 - t1)
        total.append(t2 - t0)
        kinds.append(kind)
    ms = 1000.0
    out = {
        "nodes": float(len(cluster.nodes)),
        "fresh_ms": statistics.median(fresh) * ms,
        "first_ms": first * ms,
        "p50_ms": pct(comp, 0.5) * ms,
        "p99_ms": pct(comp, 0.99) * ms,
        "max_ms": max(comp) * ms,
        "total_p50_ms": pct(total, 0.5) * ms,
        "total_max_ms": max(total) * ms,
    }
    for kind in KINDS:
        out[kind] = statistics.median(c for c, k_ in zip(comp, kinds, strict=True) if k_ == kind) * ms
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="2000:200,10000:1000,50000:1000")
    ap.add_argument("--changes", type=int, default=60)
    ap.add_argument("--note", default="", help="a word for the results header (e.g. before / after a change)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    git = subprocess.run(["git", "log", "-1", "--format=%h %s"], capture_output=True, text=True, check=False)
    head = os.environ.get("BENCH_HEAD") or git.stdout.strip()[:90]
    rows = []
    for size in args.sizes.split(","):
        pods, policies = (int(x) for x in size.split(":"))
        r = run(pods, policies, args.changes)
        cells = [
            pods,
            policies,
            f"{r['nodes']:.0f}",
            f"{r['fresh_ms']:.0f}",
            f"{r['first_ms']:.0f}",
            f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f} / {r['max_ms']:.1f}",
            " / ".join(f"{r[k]:.1f}" for k in KINDS),
            f"{r['total_p50_ms']:.1f} / {r['total_max_ms']:.1f}",
        ]
        line = "| " + " | ".join(str(c) for c in cells) + " |"
        print(line, flush=True)
        rows.append(line)
    note = f", {args.note}" if args.note else ""
    header = (
        f"\n### {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}{note} — new model (endpoints on every node, 100 "
        f"pods per node), snapshots from agent.cache.Cache — `bench/policy_compile.py --sizes {args.sizes} "
        f"--changes {args.changes}`\n\n"
        f"{describe(load_before)}; head `{head}`.\n\n"
        "| pods | policies | nodes | fresh compile ms (median of 3) | incremental first ms "
        "| one change: compile p50 / p99 / max ms | p50 local pod / policy / remote pod ms "
        "| snapshot + compile p50 / max ms |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    print(header)
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as fh:
            fh.write(header + "\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
