"""Benchmark: policy programming latency, cold sync and memory, end to end through a real etcd.

    .venv/bin/python bench/policy_latency.py [--sizes 2000:200,10000:1000] [--changes 20] [--backend nft]

For each size (pods:policies) a child process (so its peak RSS is its own) fills a fresh etcd with a synthetic
cluster (bench/policy_model.py: 100 pods per node, every pod with its endpoint on its own node, node records, pool,
blocks and affinities; the measured node is one of them), then runs the real agent path: datastore watcher →
cache → incremental compiler (agent.calc.policy.PolicyCompiler) → PolicySyncer → iptables-restore / ipset restore
into a node network namespace. It measures

- cold sync: from the cache being in sync to the rules in the kernel, split into compile and write; and the time
  a bare ``ipset restore`` + ``iptables-restore`` of the same final text takes in a fresh namespace (the floor);
- changes, in turn: a local pod relabelled, one policy's port changed, a pod on another node relabelled → etcd
  put → rules in the kernel (``iptables-restore`` returned), p50/p99, split into the cache snapshot, compile and
  write; p50 / p99 per kind;
- a policy whose ingress lists ``--ipblocks`` ipBlock CIDRs (an allow-list of customer networks, /16 to /32, some
  with excepts; selecting a local pod): put → kernel, one CIDR edited → kernel, deleted → kernel;
- the peak RSS of the child.

Appends a table to bench/results/policy.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.cache import Cache
from agent.calc.policy import PolicyCompiler, compile_node
from agent.dataplane.backend import Backend
from agent.dataplane.cmd import CommandRunner
from agent.dataplane.policy_syncer import Desired, PolicySyncer, SyncReport
from agent.dataplane.programmer import PolicyDataplane
from bench import netns_lock
from bench.machine import describe
from bench.policy_model import customer_networks, synthetic
from datastore import codec
from datastore import model as m
from datastore.etcd import EtcdClient, Put
from datastore.store import Store
from testbed.etcd_server import EtcdServer
from testbed.netns import NetnsBed

RESULTS = Path(__file__).resolve().parent / "results" / "policy.md"
NODE = "n1"
LOCAL = 100


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


class GcPauses:
    """Python's cyclic garbage collector stops every thread while it runs: its full (generation 2) passes over a
    big cache are a candidate for latency tails, so the child records them."""

    def __init__(self) -> None:
        self.full: list[float] = []
        self._t = 0.0
        gc.callbacks.append(self._cb)

    def _cb(self, phase: str, info: dict[str, int]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._t = time.perf_counter()
        else:
            self.full.append(time.perf_counter() - self._t)


def child(
    endpoint: str, pods: int, policies: int, changes: int, *, backend: str, ipblocks: int, namespaces: int
) -> dict[str, Any]:
    client = EtcdClient([endpoint])
    client.delete_prefix("/")
    cluster = synthetic(pods, policies, NODE, LOCAL, namespaces=namespaces)
    objs = cluster.objects()
    for i in range(0, len(objs), 100):
        client.txn([], [Put(codec.key_of(o).path, codec.encode(o)) for o in objs[i : i + 100]])
    store = Store(client)

    compile_s: dict[int, float] = {}  # revision -> compile seconds
    snapshot_s: dict[int, float] = {}  # revision -> seconds the cache took to hand out the snapshot
    reports: list[tuple[float, SyncReport]] = []
    cond = threading.Condition()

    with NetnsBed() as bed:
        ns = bed.netns("lat")
        runner = CommandRunner(ns.name)
        cache_ref: list[Cache] = []
        compiler = PolicyCompiler()  # incremental, as the agent runs it

        def desired() -> Desired | None:
            t0 = time.perf_counter()
            snap = cache_ref[0].snapshot()
            if not snap.in_sync:
                return None
            t = time.perf_counter()
            state = compile_node(snap, NODE, compiler).state
            compile_s[snap.revision] = time.perf_counter() - t
            snapshot_s[snap.revision] = t - t0
            return Desired(snap.revision, state)

        def on_synced(r: SyncReport) -> None:
            with cond:
                reports.append((time.perf_counter(), r))
                cond.notify_all()

        def wait_for(revision: int, timeout: float = 120) -> tuple[float, SyncReport]:
            with cond:
                ok = cond.wait_for(lambda: any(r.revision >= revision for _, r in reports), timeout=timeout)
                if not ok:
                    raise RuntimeError(f"no sync reached revision {revision}")
                return next((t, r) for t, r in reports if r.revision >= revision)

        syncer = PolicySyncer(
            PolicyDataplane(runner, Backend(backend)), desired, resync_interval=3600, on_synced=on_synced
        )
        cache = Cache(client, on_change=syncer.mark_dirty)
        cache_ref.append(cache)
        syncer.start()
        t0 = time.perf_counter()
        cache.start()
        if not cache.in_sync.wait(120):
            raise RuntimeError("cache never in sync")
        t_in_sync = time.perf_counter()
        t_done, first = wait_for(1)
        cold = {
            "load_s": t_in_sync - t0,
            "cold_total_s": t_done - t_in_sync,
            "cold_compile_s": compile_s[first.revision],
            "cold_write_s": first.seconds,
        }
        state_rules = int(runner.run(["sh", "-c", f"iptables-{backend}-save -t filter | grep -c '^-A'"]).stdout)
        state_sets = runner.run(["ipset", "save"]).stdout
        ipt_text = runner.run([f"iptables-{backend}-save", "-t", "filter"]).stdout
        members = sum(1 for line in state_sets.splitlines() if line.startswith("add "))

        # The floor: the same final text restored in one go into a fresh namespace.
        fresh = bed.netns("floor")
        t = time.perf_counter()
        CommandRunner(fresh.name).run(["ipset", "restore"], stdin=state_sets)
        CommandRunner(fresh.name).run([f"iptables-{backend}-restore"], stdin=ipt_text)
        cold["floor_s"] = time.perf_counter() - t

        # What starting one tool inside the namespace costs (a sync starts two or three): paid by the test bed's
        # `ip netns exec`, mostly not by an agent running in the host namespace.
        spawn = []
        for _ in range(10):
            t = time.perf_counter()
            runner.run(["true"])
            spawn.append(time.perf_counter() - t)
        cold["spawn_s"] = statistics.median(spawn)

        # Changes: relabel a local pod (its sets change), change one policy's port (its chain changes), relabel a
        # pod of another node (sets with its IP change; in a cluster of N nodes, N-1 of N pod changes are these).
        pauses = GcPauses()
        lat: list[float] = []
        snap_t: list[float] = []
        comp: list[float] = []
        write: list[float] = []
        kinds: list[str] = []
        local_pods = [p for p in cluster.pods if p.node == NODE]
        remote_pods = [p for p in cluster.pods if p.node != NODE] or local_pods
        port_policies = [p for p in cluster.policies if "ports" in json.dumps(p.spec) and "ingress" in p.spec]
        for i in range(changes):
            obj: codec.Model
            if i % 3 != 1:
                p = (local_pods if i % 3 == 0 else remote_pods)[
                    (i * 7919) % len(local_pods if i % 3 == 0 else remote_pods)
                ]
                labels = dict(p.labels, app="relabelled" if p.labels.get("app") != "relabelled" else "web")
                obj = m.Pod(p.namespace, p.name, labels, p.ips, p.node, p.named_ports)
                kinds.append("local pod" if i % 3 == 0 else "remote pod")
            else:
                pol = port_policies[(i // 3) % len(port_policies)]
                spec = json.loads(json.dumps(pol.spec))
                spec["ingress"][0]["ports"][0]["port"] = 20000 + i
                obj = m.Policy(pol.namespace, pol.name, spec)
                kinds.append("policy")
            t = time.perf_counter()
            rev = store.put(obj)
            t_done, r = wait_for(rev)
            lat.append(t_done - t)
            snap_t.append(snapshot_s.get(r.revision, float("nan")))
            comp.append(compile_s.get(r.revision, float("nan")))
            write.append(r.seconds)
            time.sleep(0.05)
        gc_full = list(pauses.full)
        by_kind = {
            kind: [x for x, k_ in zip(lat, kinds, strict=True) if k_ == kind]
            for kind in ("local pod", "policy", "remote pod")
        }

        # The allow-list policy: one peer list of ``ipblocks`` CIDRs, selecting the pods of ns0 (p0 is local).
        big: dict[str, float] = {}
        if ipblocks:
            peers = customer_networks(ipblocks)
            spec = {"podSelector": {}, "ingress": [{"from": peers, "ports": [{"port": 443, "protocol": "TCP"}]}]}
            count_rules = ["sh", "-c", f"iptables-{backend}-save -t filter | grep -c '^-A'"]
            rules_before = int(runner.run(count_rules).stdout)
            for step in ("add", "edit", "delete"):
                t = time.perf_counter()
                if step == "delete":
                    store.delete(codec.key_of(m.Policy("ns0", "customers", {})))
                    rev = rev + 1  # this etcd has no other writer: the delete is the next revision
                else:
                    if step == "edit":
                        peers[0] = {"ipBlock": {"cidr": "203.0.113.0/24"}}
                    rev = store.put(m.Policy("ns0", "customers", spec))
                t_done, r = wait_for(rev, timeout=600)
                big[f"ipblocks_{step}_s"] = t_done - t
                big[f"ipblocks_{step}_compile_s"] = compile_s.get(r.revision, float("nan"))
                big[f"ipblocks_{step}_write_s"] = r.seconds
                if step == "add":
                    big["ipblocks_sets"] = sum(
                        1
                        for line in runner.run(["ipset", "list", "-n"]).stdout.splitlines()
                        if line.startswith("podnet-b")
                    )
                    big["ipblocks_rules"] = int(runner.run(count_rules).stdout) - rules_before
                time.sleep(0.05)
        syncer.stop()
        cache.stop()
        PolicyDataplane(runner, Backend(backend)).remove_all()
    client.close()
    return {
        "pods": pods,
        "policies": policies,
        "rules": state_rules,
        "set_members": members,
        **cold,
        "nodes": len(cluster.nodes),
        "p50_s": statistics.median(lat),
        "p99_s": pct(lat, 0.99),
        "kinds": {k_: (statistics.median(v), pct(v, 0.99)) for k_, v in by_kind.items() if v},
        "snapshot_p50_s": statistics.median(snap_t),
        "compile_p50_s": statistics.median(comp),
        "compile_p99_s": pct(comp, 0.99),
        "write_p50_s": statistics.median(write),
        "write_p99_s": pct(write, 0.99),
        "changes": changes,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "gc_full": len(gc_full),
        "gc_full_max_s": max(gc_full, default=0.0),
        **big,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="2000:200,10000:1000")
    ap.add_argument("--changes", type=int, default=20)
    ap.add_argument("--backend", default="nft", choices=["nft", "legacy"])
    ap.add_argument("--ipblocks", type=int, default=12000, help="CIDRs in the allow-list policy (0: skip)")
    ap.add_argument(
        "--namespaces",
        type=int,
        default=0,
        help="namespaces at every size (default: one per 100 pods; a fixed count keeps the node's own rules alike)",
    )
    ap.add_argument("--note", default="", help="a word for the results header (e.g. before / after a change)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        endpoint, pods, policies = args.child.split(",")
        print(
            json.dumps(
                child(
                    endpoint,
                    int(pods),
                    int(policies),
                    args.changes,
                    backend=args.backend,
                    ipblocks=args.ipblocks,
                    namespaces=args.namespaces,
                )
            )
        )
        return 0

    lock = netns_lock.hold()  # noqa: F841 - held until the process exits
    load_before = os.getloadavg()[0]
    # The code measured: this checkout's head, or (for a run from an exported tree) what BENCH_HEAD says.
    git = subprocess.run(["git", "log", "-1", "--format=%h %s"], capture_output=True, text=True, check=False)
    head = os.environ.get("BENCH_HEAD") or git.stdout.strip()[:90]
    server = EtcdServer().start()
    rows: list[dict[str, Any]] = []
    try:
        for size in args.sizes.split(","):
            pods, policies = size.split(":")
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    f"{server.endpoint},{pods},{policies}",
                    "--changes",
                    str(args.changes),
                    "--backend",
                    args.backend,
                    "--ipblocks",
                    str(args.ipblocks),
                    "--namespaces",
                    str(args.namespaces),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if out.returncode != 0:
                print(out.stderr, file=sys.stderr)
                return 1
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(row, flush=True)
            rows.append(row)
    finally:
        server.stop()

    ms = 1000.0
    stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    note = f", {args.note}" if args.note else ""
    lines = [
        f"### Programming latency, {stamp} UTC{note} (new model: endpoints on every node, {LOCAL} pods per node; "
        f"iptables-{args.backend}, {args.changes} changes per size"
        f"{f', {args.namespaces} namespaces at every size' if args.namespaces else ''}; "
        "real etcd → cache → compiler → writers)",
        "",
        f"{describe(load_before)}; head `{head}`.",
        "",
        "| pods / policies / nodes | rules / set members | change → kernel p50 / p99 | local pod / policy / remote pod "
        "p50 (p99) | of which snapshot / compile p50 | compile p99 | write p50 / p99 | cold sync: compile + write "
        "| restore floor | write / floor | peak RSS | full GC passes during the changes (longest) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kinds = " / ".join(f"{v[0] * ms:.0f} ({v[1] * ms:.0f})" for v in r["kinds"].values())
        lines.append(
            f"| {r['pods']} / {r['policies']} / {r['nodes']} | {r['rules']} / {r['set_members']} "
            f"| {r['p50_s'] * ms:.0f} / {r['p99_s'] * ms:.0f} ms | {kinds} ms "
            f"| {r['snapshot_p50_s'] * ms:.1f} / {r['compile_p50_s'] * ms:.1f} ms | {r['compile_p99_s'] * ms:.0f} ms "
            f"| {r['write_p50_s'] * ms:.1f} / {r['write_p99_s'] * ms:.1f} ms "
            f"| {r['cold_compile_s'] * ms:.0f} + {r['cold_write_s'] * ms:.0f} ms | {r['floor_s'] * ms:.0f} ms "
            f"| {r['cold_write_s'] / r['floor_s']:.2f}x | {r['peak_rss_mb']:.0f} MB "
            f"| {r['gc_full']} ({r['gc_full_max_s'] * ms:.0f} ms) |"
        )
    if args.ipblocks:
        lines += [
            "",
            f"A policy whose one ingress peer list has {args.ipblocks} ipBlock CIDRs (/16-/32, some with excepts), "
            "put → kernel, one CIDR edited → kernel, deleted → kernel (compile + write):",
            "",
            "| pods / policies | ipBlock sets / rules it added | put | edit | delete |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            cells = [
                f"{r[f'ipblocks_{s}_s']:.2f} s ({r[f'ipblocks_{s}_compile_s']:.2f} + {r[f'ipblocks_{s}_write_s']:.2f})"
                for s in ("add", "edit", "delete")
            ]
            lines.append(
                f"| {r['pods']} / {r['policies']} | {r['ipblocks_sets']} / {r['ipblocks_rules']} | "
                + " | ".join(cells)
                + " |"
            )
    text = "\n".join([*lines, ""])
    print(text)
    if not args.no_write:
        RESULTS.parent.mkdir(exist_ok=True)
        with RESULTS.open("a") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
