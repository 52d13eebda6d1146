"""Entry point of ``podnet-agent``.

    podnet-agent cleanup [--netns NS] [--backend auto|legacy|nft] [--node NAME --etcd-endpoints HOST:PORT[,…]]

Only ``cleanup`` exists so far (``daemon.cleanup``); the daemon itself and every other subcommand say "not
implemented yet" and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from agent.dataplane.backend import BACKENDS
from agent.dataplane.netlink import NetlinkError
from daemon.cleanup import cleanup
from datastore.errors import DatastoreError

NOT_IMPLEMENTED = "podnet-agent: not implemented yet"


def _cleanup(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="podnet-agent cleanup", description="Remove everything podnet owns on this node, and nothing else."
    )
    ap.add_argument("--netns", default=None, help="work in this network namespace (under /run/netns)")
    ap.add_argument("--backend", default="auto", choices=("auto", *BACKENDS), help="iptables backend (auto: both)")
    ap.add_argument("--node", default=None, help="this node's name: its status keys in etcd are deleted")
    ap.add_argument("--etcd-endpoints", default="", help="comma-separated etcd endpoints (host:port)")
    args = ap.parse_args(argv)
    endpoints = [e.strip() for e in args.etcd_endpoints.split(",") if e.strip()]
    if bool(args.node) != bool(endpoints):
        ap.error("--node and --etcd-endpoints go together")
    try:
        res = cleanup(netns=args.netns, backend=args.backend, node=args.node, etcd_endpoints=endpoints)
    except (OSError, RuntimeError, NetlinkError, DatastoreError, ValueError) as exc:
        print(f"podnet-agent cleanup: {exc}", file=sys.stderr)
        return 1
    for what, items in (
        ("chain", res.chains),
        ("jump from", res.jumps),
        ("ipset", res.sets),
        ("route", res.routes),
        ("device", res.devices),
        ("status key", res.status_keys),
    ):
        for item in items:
            print(f"removed {what} {item}")
    print(f"cleanup done: {res.removed} object(s) removed")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["cleanup"]:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        return _cleanup(args[1:])
    # The daemon and the other subcommands are built by a later issue.
    print(NOT_IMPLEMENTED, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
