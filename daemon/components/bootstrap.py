"""The node component: the agent's first duty once the datastore can be read, and its periodic re-check.

``start()`` blocks (the supervisor starts the policy writer and the router only after it): it waits for the
datastore's first snapshot (``cache_sync_timeout``; past it the agent exits saying why), detects the node's address
(``node_ip``), writes the node record by compare-and-swap keeping the operator's fields, takes tunnel addresses
from IPAM and sets the sysctls the dataplane needs. Then ``daemon.bootstrap.AddressWatcher`` re-checks the address
every ``interval`` seconds.
"""

from __future__ import annotations

import logging
import threading
import time

from agent.cache import Cache
from daemon import autodetect
from daemon.bootstrap import AddressWatcher, NodeRegistration, RegistrationError, register_node, set_sysctls
from daemon.bootstrap import tunnel_kinds as pool_tunnel_kinds
from daemon.component import Health
from daemon.config import AgentConfig
from daemon.threads import Threads
from datastore.errors import DatastoreError
from datastore.etcd import EtcdClient

log = logging.getLogger(__name__)
RECHECK = 30.0  # seconds between address re-checks


class BootstrapError(RuntimeError):
    pass


class BootstrapComponent:
    name = "node"

    def __init__(self, client: EtcdClient, cache: Cache, config: AgentConfig, threads: Threads) -> None:
        self.client = client
        self.cache = cache
        self.config = config
        self.threads = threads
        self.registration: NodeRegistration | None = None
        self.watcher: AddressWatcher | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        c = self.config
        end = time.monotonic() + c.cache_sync_timeout
        while not self.cache.in_sync.wait(0.2) and time.monotonic() < end:
            if self._stopping.is_set():
                raise BootstrapError("stopped before the datastore was read")
        if not self.cache.in_sync.is_set():
            why = "; ".join(self.cache.problems()) or "no complete answer"
            raise BootstrapError(
                f"cannot read the datastore at {','.join(c.etcd_endpoints)} within {c.cache_sync_timeout:.0f} s "
                f"({why}); the dataplane is left as it is"
            )
        log.info("datastore in sync (revision %d)", self.cache.snapshot().revision)
        try:
            detected = autodetect.detect(c.node_ip, c.netns)
        except autodetect.AutodetectError as exc:
            raise BootstrapError(f"node IP autodetection ({c.node_ip.text}): {exc}") from None
        log.info("%s", detected.explain())
        try:
            reg = register_node(self.client, c.node_name, detected, c.as_number)
        except (DatastoreError, RegistrationError) as exc:
            raise BootstrapError(f"cannot register node {c.node_name}: {exc}") from None
        self.registration = reg
        log.info("%s", reg.describe())
        for problem in reg.problems:
            log.warning("node %s: %s", c.node_name, problem)
        kinds = pool_tunnel_kinds(self.cache.snapshot().pools.values())
        if c.run_router:
            set_sysctls(c.netns, kinds or "none")
        self.watcher = AddressWatcher(
            self.client,
            c.node_name,
            c.node_ip,
            detected,
            self.threads,
            as_number=c.as_number,
            netns=c.netns,
            encapsulation=kinds if c.run_router else (),
            interval=RECHECK,
            name=self.name,
        )
        self.watcher.start()

    def problems(self) -> list[str]:
        reg = self.registration
        return list(reg.problems) if reg is not None else []

    def stop(self, deadline: float) -> None:
        self._stopping.set()
        if self.watcher is not None:
            self.watcher.stop(deadline)

    def health(self) -> Health:
        if self.watcher is not None:
            return self.watcher.health()
        return Health(True, False, "waiting for the datastore", time.monotonic(), self.config.cache_sync_timeout + 30)
