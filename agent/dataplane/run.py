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
from collections.abc import Callable, Mapping
from pathlib import Path

from agent.calc.policy import PolicyStatus
from agent.calc.state import Chain, DataplaneState
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


class RejectedLog:
    """Logs a policy's rejection when it starts or its reason changes, and when it ends: not on every sync."""

    def __init__(self) -> None:
        self.current: dict[tuple[str, str], str] = {}

    def update(self, statuses: Mapping[tuple[str, str], PolicyStatus]) -> None:
        now = {key: s.reason for key, s in statuses.items() if not s.accepted}
        for key, reason in sorted(now.items()):
            if self.current.get(key) != reason:
                logging.warning("policy %s/%s rejected: %s", key[0], key[1], reason)
        for key in sorted(set(self.current) - set(now)):
            logging.info("policy %s/%s no longer rejected", key[0], key[1])
        self.current = now


class PolicyChains:
    """Which policy a chain was compiled from (its ``pi-``/``pe-`` chains), for charging a kernel refusal to it."""

    def __init__(self) -> None:
        self._names: dict[str, tuple[str, str]] = {}  # policy ident -> its two chain names (hashing is not free)

    def source_of(self, idents: list[str]) -> Callable[[str], str | None]:
        from agent.calc.policy.chains import policy_chain
        from agent.calc.policy.spec import EGRESS, INGRESS

        def find(chain: str) -> str | None:
            if not chain.startswith(("podnet-pi-", "podnet-pe-")):
                return None
            for ident in idents:
                if ident not in self._names:
                    self._names[ident] = (policy_chain(ident, INGRESS), policy_chain(ident, EGRESS))
                if chain in self._names[ident]:
                    return ident
            return None

        return find


# Test hook: PODNET_TEST_MISSING_MATCH=sctp makes the writer behave as on a kernel without the sctp match (xt_sctp,
# an optional module some kernels lack): each rule using it is written with the ipvs match instead, which this
# kernel does lack, so the kernel refuses exactly the rules such a kernel would. Nothing else is altered.
MISSING_MATCH_ENV = "PODNET_TEST_MISSING_MATCH"


def simulate_missing_match(state: DataplaneState, match: str) -> DataplaneState:
    def alter(chain: Chain) -> Chain:
        rules = tuple(r.replace(f"-m {match} --dport ", "-m ipvs --vport ") for r in chain.rules)
        return chain if rules == chain.rules else Chain(chain.name, rules, chain.hashed)

    tables = {t: {n: alter(c) for n, c in chains.items()} for t, chains in state.tables.items()}
    return DataplaneState(state.ipsets, tables, state.jumps)


def _from_etcd(
    endpoints: list[str], node: str
) -> tuple[Callable[[], Desired | None], Callable[[PolicySyncer, threading.Event], None]]:
    from agent.cache import Cache
    from agent.calc.nat import merged, nat_state
    from agent.calc.policy import PolicyCompiler, compile_node
    from datastore.etcd import EtcdClient

    client = EtcdClient(endpoints)
    syncers: list[PolicySyncer] = []  # the cache is told where changes go once the syncer exists
    cache = Cache(client, on_change=lambda: syncers[0].mark_dirty() if syncers else None)
    compiler = PolicyCompiler()  # incremental: a change costs what it touches (used from the syncer thread only)
    rejected = RejectedLog()
    chains = PolicyChains()
    missing_match = os.environ.get(MISSING_MATCH_ENV)

    def desired() -> Desired | None:
        snap = cache.snapshot()
        if not snap.in_sync:
            return None
        result = compile_node(snap, node, compiler, refused=syncers[0].refused if syncers else None)
        rejected.update(result.statuses)
        state = merged(result.state, nat_state(snap, node))
        if missing_match:
            state = simulate_missing_match(state, missing_match)

        def version_of(ident: str) -> object:
            namespace, _, name = ident.partition("/")
            return snap.policies.get((namespace, name))

        idents = [f"{ns}/{name}" for ns, name in result.compiled.policies]
        return Desired(snap.revision, state, chains.source_of(idents), version_of)

    def watch(syncer: PolicySyncer, stop: threading.Event) -> None:
        syncers.append(syncer)
        cache.start()
        stop.wait()
        cache.stop()
        client.close()

    return desired, watch


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
