"""A standalone policy dataplane writer, fed either by a JSON state file or by the datastore itself.

    python -m agent.dataplane.run --state FILE [--sync-period 30s] [--iptables-backend auto|legacy|nft]
    python -m agent.dataplane.run --etcd-endpoints HOST:PORT[,…] --node-name NAME [--sync-period 30s] [--etcd-ca-file …]
    python -m agent.dataplane.run --remove        delete every podnet chain, jump and ipset, then exit

Options are spelled as podnet-agent spells them (``--help``; the old ``--etcd``, ``--node``, ``--resync`` and
``--backend`` still work, with a warning). ``--state`` keeps the state in the file programmed (re-read when it
changes). ``--etcd-endpoints`` runs the agent's policy
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

from agent.dataplane.backend import BACKENDS, detect
from agent.dataplane.cmd import CommandRunner
from agent.dataplane.policy_syncer import Desired, PolicySyncer, SyncReport
from agent.dataplane.programmer import PolicyDataplane
from agent.dataplane.statefile import StateFileError, from_json
from datastore import cli_options as opt
from datastore.etcd import DEFAULT_TIMEOUT, EtcdTLS


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
    endpoints: list[str], node: str, tls: EtcdTLS | None = None, timeout: float = DEFAULT_TIMEOUT
) -> tuple[Callable[[], Desired | None], Callable[[PolicySyncer, threading.Event], None]]:
    from agent.cache import Cache
    from agent.policy_feed import PolicyFeed
    from datastore.etcd import EtcdClient

    client = EtcdClient(endpoints, timeout=timeout, tls=tls)
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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m agent.dataplane.run", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--state", type=Path, metavar="FILE", help="program the state in this JSON file (re-read on change)"
    )
    ap.add_argument("--remove", action="store_true", help="delete every podnet chain, jump and ipset, then exit")
    opt.add_option(ap, "--etcd-endpoints", "Program the policy in etcd: its endpoints, comma-separated.",
                   aliases=("--etcd",), metavar="HOST:PORT[,…]")  # fmt: skip
    opt.add_etcd_tls(ap)
    opt.add_option(ap, "--etcd-timeout", "Deadline of each etcd request.", default=str(DEFAULT_TIMEOUT),
                   type=opt.seconds, metavar="DURATION")  # fmt: skip
    opt.add_option(ap, "--node-name", "The node whose endpoints' policy to program (with --etcd-endpoints).",
                   aliases=("--node",), metavar="NAME")  # fmt: skip
    opt.add_option(ap, "--sync-period", "Period of the full verify/resync pass.", default="30s",
                   aliases=("--resync",), type=opt.seconds, metavar="DURATION")  # fmt: skip
    opt.add_option(ap, "--iptables-backend", "iptables backend; auto: the one kubelet's hint chain is in.",
                   default="auto", aliases=("--backend",), choices=("auto", *BACKENDS))  # fmt: skip
    opt.add_option(ap, "--netns", "Program this network namespace (the process itself stays put).", metavar="NAME")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    runner = CommandRunner(args.netns)
    dataplane = PolicyDataplane(runner, detect(runner, args.iptables_backend))
    if args.remove:
        dataplane.remove_all()
        return 0
    if args.state is not None:
        desired, watch = _from_file(args.state)
    elif args.etcd_endpoints:
        if not args.node_name:
            ap.error("--etcd-endpoints needs --node-name")
        try:
            tls = opt.etcd_tls(args)
        except ValueError as exc:
            ap.error(str(exc))
        endpoints = opt.endpoint_list(args.etcd_endpoints)
        desired, watch = _from_etcd(endpoints, args.node_name, tls, args.etcd_timeout)
    else:
        ap.error("one of --state, --etcd-endpoints or --remove is required")

    syncer = PolicySyncer(dataplane, desired, resync_interval=args.sync_period, on_synced=_report)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    syncer.start()
    syncer.mark_dirty()
    watch(syncer, stop)
    syncer.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
