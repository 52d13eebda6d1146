"""A standalone policy dataplane writer: keeps the state in a JSON file programmed (re-read when it changes).

    python -m agent.dataplane.run --state FILE [--resync SECONDS] [--backend auto|legacy|nft]
    python -m agent.dataplane.run --remove        delete every podnet chain, jump and ipset, then exit

Run it inside a network namespace (``ip netns exec NS …``) to program that namespace. Prints one line per sync that
wrote something or was full ("synced <revision> full|incremental <ms>ms wrote=<objects written>"), so a caller can
wait for convergence.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from agent.dataplane.backend import detect
from agent.dataplane.cmd import Runner
from agent.dataplane.policy_syncer import Desired, PolicySyncer, SyncReport
from agent.dataplane.programmer import PolicyDataplane
from agent.dataplane.statefile import StateFileError, from_json


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agent.dataplane.run", description=__doc__.split("\n")[0])
    ap.add_argument("--state", type=Path)
    ap.add_argument("--resync", type=float, default=30.0)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--remove", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    dataplane = PolicyDataplane(Runner(), detect(Runner(), args.backend))
    if args.remove:
        dataplane.remove_all()
        return 0
    if args.state is None:
        ap.error("--state is required")
    path: Path = args.state

    def desired() -> Desired | None:
        try:
            return Desired(path.stat().st_mtime_ns, from_json(path.read_text()))
        except (OSError, StateFileError) as exc:
            # Not "in sync": write nothing rather than program an empty state.
            logging.error("cannot read %s: %s", path, exc)
            return None

    def report(r: SyncReport) -> None:
        if r.result.wrote or r.result.full:
            kind = "full" if r.result.full else "incremental"
            res = r.result
            wrote = len(res.chains_written) + len(res.chains_deleted) + len(res.jumps_fixed) + res.sets_changed
            print(f"synced {r.revision} {kind} {r.seconds * 1000:.1f}ms wrote={wrote}", flush=True)

    syncer = PolicySyncer(dataplane, desired, resync_interval=args.resync, on_synced=report)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    syncer.start()
    syncer.mark_dirty()
    last = None
    while not stop.is_set():
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:
            mtime = None
        if mtime != last:
            last = mtime
            syncer.mark_dirty()
        stop.wait(0.05)
    syncer.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
