"""A standalone policy dataplane writer, fed either by a JSON state file or by the datastore itself.

    python -m agent.dataplane.run --state FILE [--resync SECONDS] [--backend auto|legacy|nft]
    python -m agent.dataplane.run --etcd HOST:PORT[,…] --node NAME [--resync SECONDS] [--backend …]
    python -m agent.dataplane.run --remove        delete every podnet chain, jump and ipset, then exit

``--state`` keeps the state in the file programmed (re-read when it changes). ``--etcd`` runs the agent's policy
path: datastore watcher → cache → compiler (agent.calc.policy) and natOutgoing (agent.calc.nat) → writers, for
node NAME; a policy whose rules the kernel refuses is compiled to allow nothing until it changes. Run it inside a
network namespace (``ip netns exec NS …``), or pass ``--netns NS``, to program that namespace. Prints one line per sync
that wrote something or was full ("synced <revision> full|incremental <ms>ms wrote=<objects written>"), so a
caller can wait for convergence.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from agent.dataplane.backend import detect
from agent.dataplane.cmd import Runner
from agent.dataplane.policy_syncer import Desired, PolicySyncer, SyncReport
from agent.dataplane.programmer import PolicyDataplane
from agent.dataplane.statefile import StateFileError, from_json


def _report(r: SyncReport) -> None:
    if r.result.wrote or r.result.full:
        kind = "full" if r.result.full else "incremental"
        res = r.result
        wrote = len(res.chains_written) + len(res.chains_deleted) + len(res.jumps_fixed) + res.sets_changed
        print(f"synced {r.revision} {kind} {r.seconds * 1000:.1f}ms wrote={wrote}", flush=True)


def _from_file(path: Path) -> tuple[Callable[[], Desired | None], Callable[[PolicySyncer, threading.Event], None]]:
    def desired() -> Desired | None:
        try:
            return Desired(path.stat().st_mtime_ns, from_json(path.read_text()))
        except (OSError, StateFileError) as exc:
            # Not "in sync": write nothing rather than program an empty state.
            logging.error("cannot read %s: %s", path, exc)
            return None

    def watch(syncer: PolicySyncer, stop: threading.Event) -> None:
        last = None
        while not stop.is_set():
            try:
                mtime: int | None = os.stat(path).st_mtime_ns
            except OSError:
                mtime = None
            if mtime != last:
                last = mtime
                syncer.mark_dirty()
            stop.wait(0.05)

    return desired, watch


def _from_etcd(
    endpoints: list[str], node: str
) -> tuple[Callable[[], Desired | None], Callable[[PolicySyncer, threading.Event], None]]:
    from agent.cache import Cache
    from agent.policy_feed import PolicyFeed
    from datastore.etcd import EtcdClient

    client = EtcdClient(endpoints)
    syncers: list[PolicySyncer] = []  # the cache is told where changes go once the syncer exists
    cache = Cache(client, on_change=lambda: syncers[0].mark_dirty() if syncers else None)
    feed = PolicyFeed(cache, node, refused=lambda: syncers[0].refused if syncers else {})

    def watch(syncer: PolicySyncer, stop: threading.Event) -> None:
        syncers.append(syncer)
        cache.start()
        stop.wait()
        cache.stop()
        client.close()

    return feed.desired, watch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agent.dataplane.run", description=__doc__.split("\n")[0])
    ap.add_argument("--state", type=Path)
    ap.add_argument("--etcd", default=None, help="comma-separated etcd endpoints (host:port)")
    ap.add_argument("--node", default=None)
    ap.add_argument("--resync", type=float, default=30.0)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--remove", action="store_true")
    ap.add_argument("--netns", default=None, help="program this network namespace (the process itself stays put)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    runner = Runner(args.netns)
    dataplane = PolicyDataplane(runner, detect(runner, args.backend))
    if args.remove:
        dataplane.remove_all()
        return 0
    if args.etcd:
        if not args.node:
            ap.error("--etcd needs --node")
        desired, watch = _from_etcd([e.strip() for e in args.etcd.split(",") if e.strip()], args.node)
    elif args.state is not None:
        desired, watch = _from_file(args.state)
    else:
        ap.error("one of --state, --etcd or --remove is required")

    syncer = PolicySyncer(dataplane, desired, resync_interval=args.resync, on_synced=_report)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    syncer.start()
    syncer.mark_dirty()
    watch(syncer, stop)
    syncer.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
