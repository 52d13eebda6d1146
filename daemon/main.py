"""Entry point of ``podnet-agent``.

podnet-agent [run] [OPTIONS]       the node daemon (daemon.run); OPTIONS: podnet-agent --help
podnet-agent config [OPTIONS] [-o text|json]   the effective configuration, with the source of each value
podnet-agent cleanup [--netns NS] [--backend auto|legacy|nft] [--node NAME --etcd-endpoints HOST:PORT[,…]]
podnet-agent version
"""

from __future__ import annotations

import os

# gRPC's C core reads these when it is imported: its fork-support and info lines say nothing about podnet (our
# channels are never used in a child process), so they are off unless asked for.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import argparse
import logging
import sys
from collections.abc import Sequence

from agent.dataplane.backend import BACKENDS
from agent.dataplane.netlink import NetlinkError
from daemon.cleanup import cleanup
from datastore.cli_options import add_etcd_tls, add_option, endpoint_list, etcd_tls
from datastore.errors import DatastoreError


def _cleanup(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="podnet-agent cleanup", description="Remove everything podnet owns on this node, and nothing else."
    )
    add_option(ap, "--netns", "work in this network namespace (under /run/netns)", metavar="NAME")
    add_option(ap, "--iptables-backend", "iptables backend (auto: both)", default="auto",
               choices=("auto", *BACKENDS), aliases=("--backend",))  # fmt: skip
    add_option(ap, "--node-name", "this node's name: its status keys in etcd are deleted", aliases=("--node",),
               metavar="NAME")  # fmt: skip
    add_option(ap, "--etcd-endpoints", "comma-separated etcd endpoints (host:port)", default="",
               metavar="HOST:PORT[,...]")  # fmt: skip
    add_etcd_tls(ap)
    args = ap.parse_args(argv)
    endpoints = endpoint_list(args.etcd_endpoints)
    if bool(args.node_name) != bool(endpoints):
        ap.error("--node-name and --etcd-endpoints go together")
    try:
        res = cleanup(netns=args.netns, backend=args.iptables_backend, node=args.node_name, etcd_endpoints=endpoints,
                      tls=etcd_tls(args))  # fmt: skip
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


def _config(argv: Sequence[str]) -> int:
    from daemon import config as c
    from daemon import config_cli

    parser = config_cli.build_parser("podnet-agent config", "Print the effective configuration and its sources.")
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text", help="output format")
    args = parser.parse_args(argv)
    try:
        resolved = config_cli.load(args)
    except c.ConfigError as exc:
        print(f"podnet-agent config: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(c.render(resolved, args.output))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args and not args[0].startswith("-") else "run"
    rest = args[1:] if args and not args[0].startswith("-") else args
    if command == "cleanup":
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        return _cleanup(rest)
    if command == "config":
        return _config(rest)
    if command == "version":
        from daemon.node import version

        print(f"podnet-agent {version()}")
        return 0
    if command == "run":
        from daemon.run import run

        return run(rest)
    print(f"podnet-agent: unknown command {command!r} (run, config, cleanup, version)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
