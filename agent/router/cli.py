"""``python -m agent.router``: one node's router alone (tests, benchmarks), with the options spelled as
``podnet-agent`` spells them; the old spellings (``--node``, ``--resync``, ``--hold-time``, ...) still work and
say they are deprecated."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from agent.router.config import RouterConfig
from agent.router.loop import Router
from bgp import speaker as speaker_module
from bgp.plan import Defaults
from bgp.speaker import SpeakerConfig
from datastore import cli_options as opt
from datastore.etcd import EtcdClient

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _whole(text: str) -> int:
    """A whole number of seconds, 0 or more (a BGP timer: 0 turns it off)."""
    try:
        value = int(text.removesuffix("s"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seconds") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def build_parser(prog: str = "python -m agent.router") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="One node's router: routes, devices and BGP, one loop.")
    opt.add_option(ap, "--node-name", "This node's name (required).", aliases=("--node",), metavar="NAME")
    opt.add_option(ap, "--etcd-endpoints", "etcd endpoints, comma-separated.", default="127.0.0.1:2379",
                   metavar="HOST:PORT[,…]")  # fmt: skip
    opt.add_etcd_tls(ap)
    opt.add_option(ap, "--netns", "Network namespace of the node (default: our own).", metavar="NAME")
    opt.add_option(ap, "--workdir", "The speaker's files (ExaBGP config, bridge socket, log) (required).",
                   type=Path, metavar="DIR")  # fmt: skip
    opt.add_option(ap, "--bgp-hold-time", "BGP hold time (seconds; 0: none).", default=str(Defaults.hold_time),
                   aliases=("--hold-time",), type=_whole, metavar="SECONDS")  # fmt: skip
    opt.add_option(ap, "--bgp-graceful-restart-time", "How long peers keep our routes when we restart (seconds).",
                   default=str(Defaults.graceful_restart_time), aliases=("--graceful-restart-time",), type=_whole,
                   metavar="SECONDS")  # fmt: skip
    opt.add_option(ap, "--sync-period", "Period of the full verify/resync pass.", default="10s",
                   aliases=("--resync",), type=opt.seconds, metavar="DURATION")  # fmt: skip
    opt.add_option(ap, "--bgp-startup-grace", "After start, how long learned routes wait for BGP to catch up.",
                   default="30s", aliases=("--startup-grace",), type=opt.seconds, metavar="DURATION")  # fmt: skip
    opt.add_option(ap, "--status-ttl", "TTL of the lease that holds the status keys (seconds).", default="20",
                   type=int, metavar="SECONDS")  # fmt: skip
    opt.add_option(ap, "--exabgp-bridge-timeout", "Restart ExaBGP when its API bridge has not connected for this long.",
                   default=str(speaker_module.BRIDGE_TIMEOUT), aliases=("--bridge-timeout",), type=opt.seconds,
                   metavar="DURATION")  # fmt: skip
    opt.add_option(ap, "--exabgp-reactor-speed", "ExaBGP's reactor speed (it polls every speed/100 s when idle).",
                   default=str(SpeakerConfig.reactor_speed), type=_positive, metavar="SPEED")  # fmt: skip
    ap.add_argument(
        "--bgp-withdraw-on-exit",
        action="store_true",
        help="on SIGTERM tell peers we are gone (default: a planned restart; peers keep our routes)",
    )
    ap.add_argument("--withdraw-on-exit", dest="bgp_withdraw_on_exit", action="store_true", help=argparse.SUPPRESS)
    opt.add_option(ap, "--log-level", "podnet's log level (default: the cluster config's logLevel, INFO until it "
                   "is read).", type=str.upper, choices=LOG_LEVELS)  # fmt: skip
    ap.add_argument("--trace", type=Path, help="append per-hop timestamps (route latency analysis) to this file")
    return ap


def _logging(node: str, level: str | None, trace_file: Path | None) -> None:
    logging.basicConfig(level=level or "INFO", format=f"%(asctime)s {node} %(name)s %(levelname)s %(message)s")
    if trace_file is not None:
        handler = logging.FileHandler(trace_file)
        handler.setFormatter(logging.Formatter(f"%(created).6f {node} %(threadName)s %(message)s"))
        tracer = logging.getLogger("podnet.trace")
        tracer.setLevel(logging.DEBUG)
        tracer.propagate = False
        tracer.addHandler(handler)


def main(argv: list[str] | None = None, prog: str = "python -m agent.router") -> int:
    ap = build_parser(prog)
    args = ap.parse_args(argv)
    if not args.node_name:
        ap.error("--node-name is required")
    if args.workdir is None:
        ap.error("--workdir is required")
    try:
        tls = opt.etcd_tls(args)
    except ValueError as exc:
        ap.error(str(exc))
    _logging(args.node_name, args.log_level, args.trace)
    config = RouterConfig(
        node=args.node_name,
        workdir=args.workdir,
        netns=args.netns,
        bgp_defaults=Defaults(hold_time=args.bgp_hold_time, graceful_restart_time=args.bgp_graceful_restart_time),
        resync=args.sync_period,
        startup_grace=args.bgp_startup_grace,
        status_ttl=args.status_ttl,
        bridge_timeout=args.exabgp_bridge_timeout,
        exabgp_reactor_speed=args.exabgp_reactor_speed,
        log_level=args.log_level,
    )
    client = EtcdClient(opt.endpoint_list(args.etcd_endpoints), tls=tls)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    router = Router(client, config).start()
    print("started", flush=True)
    done.wait()
    router.stop(withdraw=args.bgp_withdraw_on_exit)
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
