"""How long the agent's cache stays blind after the etcd member it uses hangs (SIGSTOP), in a 3-member cluster.

Each round: a fresh client and cache on a follower, a pause at a random moment of the watch streams' progress cycle,
a write through the leader, and the time until the cache has it. Prints the figures; asserts nothing.

    .venv/bin/python bench/etcd_failover.py [rounds]
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import time

from agent.cache import Cache
from datastore import codec
from datastore import model as m
from datastore.etcd import EtcdClient
from testbed.etcd_cluster import EtcdCluster


def one_round(cluster: EtcdCluster, i: int, rng: random.Random) -> tuple[float, float, int]:
    leader = cluster.leader()
    used, other = cluster.followers()
    client = EtcdClient([used.endpoint, other.endpoint, leader.endpoint])
    writer = EtcdClient([leader.endpoint])
    cache = Cache(client).start()
    try:
        assert cache.in_sync.wait(10)
        phase = rng.uniform(0.0, 10.0)
        time.sleep(phase)
        cluster.pause(used)
        start = time.monotonic()
        name = f"round-{i}"
        writer.put(codec.key_of(m.Namespace(name)).path, codec.encode(m.Namespace(name)))
        while name not in cache.snapshot().namespaces:
            if time.monotonic() - start > 30:
                return phase, float("inf"), client.stalls
            time.sleep(0.02)
        return phase, time.monotonic() - start, client.stalls
    finally:
        cluster.resume(used)
        cache.stop()
        client.close()
        writer.close()


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    rng = random.Random(1)
    cluster = EtcdCluster(3).start()
    seen: list[float] = []
    try:
        for i in range(rounds):
            phase, took, stalls = one_round(cluster, i, rng)
            seen.append(took)
            print(f"round {i}: paused {phase:4.1f}s after sync, write seen after {took:5.2f}s ({stalls}/9 by stall)")
    finally:
        cluster.stop()
    print(
        f"SIGSTOP -> cache follows: median {statistics.median(seen):.2f}s, max {max(seen):.2f}s over {rounds} rounds "
        f"(load {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs, kernel {os.uname().release})"
    )


if __name__ == "__main__":
    main()
