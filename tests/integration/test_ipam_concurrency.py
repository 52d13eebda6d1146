"""Many allocator processes against one real etcd, some SIGKILLed mid-flight: no address is ever handed out twice,
``agentctl ipam check`` reports exactly the leaks the kills caused, GC reclaims them, and the books balance.

Each worker process is a stand-in for the CNI plugin: allocate, (set up the veth), write the endpoint; and every
fourth pod, delete an earlier pod (endpoint, then release). It journals each step before and after to a file, so
the test knows which single operation a killed worker may have left half-done.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.ctl.main import cli
from datastore import keys as k
from datastore import model as m
from datastore.etcd import EtcdClient
from datastore.store import Store
from ipam.allocator import Ipam
from ipam.check import check
from ipam.gc import LeakCollector
from ipam.pools import add_pool
from testbed.etcd_server import EtcdServer
from testbed.procs import register_child, unregister_child
from testbed.wait import eventually

pytestmark = pytest.mark.integration

NODES = 4
WORKERS = 20
PER_WORKER = 500
KILLED = 5


def worker(endpoint: str, node: str, wid: int, count: int, journal: str) -> None:
    client = EtcdClient([endpoint])
    ipam = Ipam(client)
    store = Store(client)
    rng = random.Random(wid)
    live: list[tuple[str, str]] = []  # (handle, pod name)
    with open(journal, "a", buffering=1) as out:
        for i in range(count):
            handle, pod = f"w{wid}-{i}", f"pod{i}"
            out.write(f"add {handle}\n")
            ip = ipam.auto_assign(handle, node, pod=f"ns{wid}/{pod}")
            time.sleep(rng.uniform(0, 0.01))  # where the CNI would create the veth
            store.put(m.Endpoint(node, f"ns{wid}", pod, "eth0", "cali0", (f"{ip}/32",), handle=handle))
            out.write(f"added {handle} {ip}\n")
            live.append((handle, pod))
            if i % 4 == 3:
                gone, gone_pod = live.pop(rng.randrange(len(live)))
                out.write(f"del {gone}\n")
                client.delete(k.EndpointKey(node, f"ns{wid}", gone_pod, "eth0").path)
                time.sleep(rng.uniform(0, 0.005))
                ipam.release_handle(gone)
                out.write(f"deleted {gone}\n")
    client.close()


def read_journal(path: Path) -> tuple[dict[str, str], set[str], str | None]:
    """(live handle -> ip, deleted handles, the handle of the operation in flight when the worker stopped)."""
    live: dict[str, str] = {}
    deleted: set[str] = set()
    in_flight: str | None = None
    if not path.exists():
        return live, deleted, in_flight
    for line in path.read_text().split("\n")[:-1]:  # the part after the last newline may be torn by the kill
        parts = line.split()
        match parts:
            case ["add", h]:
                in_flight = h
            case ["del", h]:
                # Its fate is unknown until "deleted": etcd tells (endpoint still there = still a pod).
                live.pop(h, None)
                in_flight = h
            case ["added", h, ip]:
                live[h] = ip
                in_flight = None
            case ["deleted", h]:
                live.pop(h, None)
                deleted.add(h)
                in_flight = None
    return live, deleted, in_flight


def test_kill_storm_no_duplicates_exact_leaks_gc_reclaims(
    etcd_server: EtcdServer, etcd: EtcdClient, tmp_path: Path
) -> None:
    add_pool(Store(etcd), m.IPPool("10.244.0.0/16"))
    procs: list[subprocess.Popen[bytes]] = []
    journals = [tmp_path / f"w{i}.log" for i in range(WORKERS)]
    started = time.monotonic()
    try:
        for wid in range(WORKERS):
            p = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.integration.test_ipam_concurrency",
                    etcd_server.endpoint,
                    f"node{wid % NODES}",
                    str(wid),
                    str(PER_WORKER),
                    str(journals[wid]),
                ],
                cwd=Path(__file__).resolve().parents[2],
                stderr=subprocess.PIPE,
            )
            register_child(p.pid)
            procs.append(p)
        rng = random.Random()
        victims = rng.sample(range(WORKERS), KILLED)
        assert eventually(lambda: all(j.exists() and j.stat().st_size for j in journals), timeout=60)
        for wid in victims:
            time.sleep(rng.uniform(0.2, 2.0))  # random moments, while every worker is busy
            os.kill(procs[wid].pid, signal.SIGKILL)
        for wid, p in enumerate(procs):
            _, err = p.communicate(timeout=240)
            if wid not in victims:
                assert p.returncode == 0, err.decode()[-2000:]
            else:
                assert p.returncode == -signal.SIGKILL
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            unregister_child(p.pid)
    elapsed = time.monotonic() - started

    live: dict[str, str] = {}
    in_flight: set[str] = set()
    for wid, path in enumerate(journals):
        w_live, _, w_flight = read_journal(path)
        live.update(w_live)
        if wid in victims and w_flight is not None:
            in_flight.add(w_flight)
        if wid not in victims:
            assert w_flight is None and len(w_live) == PER_WORKER - PER_WORKER // 4
    store = Store(etcd)
    handles = {v.value.handle: v.value for v in store.list(k.HANDLES_PREFIX, m.Handle)}
    endpoints = {v.value.handle: v.value for v in store.list(k.ENDPOINTS_PREFIX, m.Endpoint)}
    # A kill after the endpoint was written (add) or before it was deleted (del) leaves a complete pod.
    live.update({h: handles[h].ips[0] for h in in_flight if h in handles and h in endpoints})
    # Zero duplicates among the addresses handed out and still held.
    dupes = [ip for ip, n in Counter(live.values()).items() if n > 1]
    assert dupes == []
    for h, ip in live.items():
        assert handles[h].ips == (ip,) and endpoints[h].ips == (f"{ip}/32",)

    # check reports exactly the kills' half-done operations that left an address without an endpoint.
    report = check(etcd)
    assert report.problems == ()
    expected = {h for h in in_flight if h in handles and h not in endpoints}
    assert report.leaked_handles == expected
    assert set(handles) == set(live) | expected

    result = CliRunner().invoke(cli, ["--etcd-endpoints", etcd_server.endpoint, "ipam", "check", "-o", "json"])
    assert result.exit_code == (1 if expected else 0), result.output
    assert set(json.loads(result.output)["leakedHandles"]) == expected

    released = LeakCollector(Ipam(etcd), grace=0).run_once()
    assert set(released) == expected
    after = check(etcd)
    assert after.ok

    # Final accounting: every allocation belongs to a live pod, and the per-node figures add up.
    blocks = [v.value for v in store.list(k.BLOCKS_PREFIX, m.Block)]
    allocated = {b.address(o): a.handle for b in blocks for o, a in b.allocations.items()}
    assert allocated == {ip: h for h, ip in live.items()}
    shown = CliRunner().invoke(cli, ["--etcd-endpoints", etcd_server.endpoint, "ipam", "show", "-o", "json"])
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.output)
    assert sum(n["used"] for n in data["nodes"]) == len(live)
    assert sum(p["used"] for p in data["pools"]) == len(live)
    assert all(n["used"] + n["free"] == n["capacity"] for n in data["nodes"])
    print(f"\n{WORKERS}x{PER_WORKER} allocations, {KILLED} killed, {len(expected)} leaked: {elapsed:.1f}s")


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
