"""``podnet-cni serve``: the CNI server (``cni.server``) as a process of its own, until SIGTERM or SIGINT.

Prints ``ready <socket>`` once it listens. Options are spelled as ``podnet-agent`` spells them; etcd TLS files given
here are used for the calls whose network configuration names none (``etcdCAFile``/``etcdCertFile``/
``etcdKeyFile`` in the conflist win).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from cni.plugin import DEFAULT_ETCD_TIMEOUT, Clients
from cni.server import CniServer
from cni.wire import DEFAULT_SOCKET
from datastore import cli_options as opt

LOG_LEVELS = ("debug", "info", "warning", "error")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="podnet-cni serve", description="Run the node-local podnet CNI server.")
    opt.add_option(parser, "--cni-socket", "Unix socket to listen on.", default=DEFAULT_SOCKET, aliases=("--socket",),
                   metavar="PATH")  # fmt: skip
    opt.add_etcd_tls(parser)
    opt.add_option(parser, "--etcd-timeout", "Deadline of each etcd request (e.g. 10s).",
                   default=str(DEFAULT_ETCD_TIMEOUT), type=opt.seconds, metavar="DURATION")  # fmt: skip
    opt.add_option(parser, "--log-level", "Log level.", default="info", choices=LOG_LEVELS)
    return parser


def serve_main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.log_level not in LOG_LEVELS:  # from the variable: argparse checks choices only on the command line
        parser.error(f"--log-level: {args.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    try:
        tls = opt.etcd_tls(args)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    clients = Clients(tls=tls, timeout=args.etcd_timeout)
    server = CniServer(args.cni_socket, clients)

    def stop(*_: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"ready {args.cni_socket}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        clients.close()
    return 0


if __name__ == "__main__":
    sys.exit(serve_main(sys.argv[1:]))
