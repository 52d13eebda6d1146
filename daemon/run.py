"""``podnet-agent run``: resolve the configuration, start the components, wait for a signal.

- Configuration errors (any source) exit 2 with one line naming the source; at start the effective configuration
  is logged, one line per option with its source.
- The datastore must be read within ``cache_sync_timeout`` or the agent exits 1 saying why (kubelet restarts it;
  the dataplane is left as it is).
- SIGTERM/SIGINT: stop within the grace period without touching the dataplane (the lease-bound status keys go);
  SIGHUP: read the config file again and apply what can change at run time (the log level, the sync period, the
  node-IP method), logging what needs a restart instead. The cluster config's log level is followed while no
  higher source sets it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from agent.logs import apply_log_level
from daemon import config as c
from daemon import config_cli
from daemon import logs as daemon_logs
from daemon.node import RELOADABLE, NodeAgent, etcd_client
from daemon.supervisor import StartError

log = logging.getLogger("daemon.run")


def _parser() -> argparse.ArgumentParser:
    return config_cli.build_parser(
        "podnet-agent", "The podnet node agent: policy, routes and BGP, the CNI server, health and metrics."
    )


class _Signals:
    def __init__(self) -> None:
        self.stop = threading.Event()
        self.reload = threading.Event()
        self.wake = threading.Event()

    def install(self) -> None:
        def on_stop(*_: object) -> None:
            self.stop.set()
            self.wake.set()

        def on_hup(*_: object) -> None:
            self.reload.set()
            self.wake.set()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)


def _changes(old: c.Resolved, new: c.Resolved) -> list[str]:
    out = []
    for o in c.OPTIONS:
        a, b = getattr(old.config, o.name), getattr(new.config, o.name)
        if a != b:
            out.append(o.name)
    return out


def run(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    try:
        resolved = config_cli.load(args)
    except c.ConfigError as exc:
        print(f"podnet-agent: {exc}", file=sys.stderr)
        return 2
    config = resolved.config
    daemon_logs.configure(config.node_name, config.log_format, config.log_level)
    for line in c.log_lines(resolved):
        log.info("config: %s", line)
    signals = _Signals()
    signals.install()
    try:
        client = etcd_client(config)
    except (ValueError, OSError) as exc:
        log.error("cannot use the etcd settings: %s", exc)
        return 2
    agent = NodeAgent(config, client)
    # SIGTERM during the start (a slow datastore) ends it: the supervisor starts nothing more once stopping.
    stopper = threading.Thread(target=_stop_when_asked, args=(agent, signals), name="stop-on-signal", daemon=True)
    stopper.start()
    try:
        agent.start()
    except StartError as exc:
        client.close()
        if signals.stop.is_set():
            log.info("stopped while starting (signal)")
            return 0
        log.error("cannot start (%s): %s", exc.name, exc.__cause__ or exc)
        return 1
    if signals.stop.is_set():
        agent.stop()
        client.close()
        return 0
    resolved = _follow_cluster(args, resolved, agent, first=True)
    while not signals.stop.is_set():
        signals.wake.wait(1.0)
        signals.wake.clear()
        if signals.stop.is_set():
            break
        if signals.reload.is_set():
            signals.reload.clear()
            resolved = _reload(args, resolved, agent)
        else:
            resolved = _follow_cluster(args, resolved, agent)
    log.info("stopping (signal); the dataplane is left as it is")
    agent.stop()
    client.close()
    return 0


def _stop_when_asked(agent: NodeAgent, signals: _Signals) -> None:
    """Only while starting: a signal then stops the supervisor (which then starts nothing more)."""
    while not signals.stop.wait(0.2):
        if agent.started.is_set():
            return
    if not agent.started.is_set():
        agent.supervisor.stop()


def _follow_cluster(args: argparse.Namespace, current: c.Resolved, agent: NodeAgent, first: bool = False) -> c.Resolved:
    """The cluster config's options (the log level) apply while no higher source sets them."""
    cluster = agent.datastore.cache.snapshot().config
    try:
        new = config_cli.load(args, cluster=cluster)
    except c.ConfigError as exc:
        if first:
            log.error("cluster config ignored: %s", exc)
        return current
    if new.config.log_level != current.config.log_level or (first and new.sources["log_level"].kind == c.CLUSTER):
        apply_log_level(new.config.log_level, str(new.sources["log_level"]))
    # Only reloadable options follow; anything else keeps the value the components were built with.
    config = dataclasses.replace(current.config, log_level=new.config.log_level)
    sources = {**current.sources, "log_level": new.sources["log_level"]}
    return c.Resolved(config, sources)


def _reload(args: argparse.Namespace, current: c.Resolved, agent: NodeAgent) -> c.Resolved:
    log.info("SIGHUP: reading the configuration again")
    try:
        new = config_cli.load(args, cluster=agent.datastore.cache.snapshot().config)
    except c.ConfigError as exc:
        log.error("SIGHUP: configuration not reloaded, keeping the running one: %s", exc)
        return current
    changed = _changes(current, new)
    later = [c.BY_NAME[n].key for n in changed if n not in RELOADABLE]
    if later:
        log.warning("SIGHUP: %s changed; that takes a restart of the agent (kept as is)", ", ".join(later))
    if "log_level" in changed:
        apply_log_level(new.config.log_level, str(new.sources["log_level"]))
    now = {n: getattr(new.config, n) for n in RELOADABLE}
    config = dataclasses.replace(current.config, **now)
    agent.reload(current.config, config)
    if not changed:
        log.info("SIGHUP: configuration unchanged")
    return c.Resolved(config, {**current.sources, **{n: new.sources[n] for n in RELOADABLE}})
