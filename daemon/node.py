"""``podnet-agent``'s composition: one process per node made of components (see docs/daemon.md).

    http  →  datastore  →  status  →  node  →  policy  →  router  →  cni

``node`` (daemon.components.bootstrap) blocks the start until the datastore is read (or fails it after
``cache_sync_timeout``), registers the node and sets its sysctls: the writers start on a known node.

The endpoints start first (probes answer while the rest start) and stop last. One etcd client and one cache (the
datastore component) feed the policy writer and the router; the status component owns the lease-bound status keys,
which the router writes its routes and peers through. A run mode that is off has no component: nothing of its kind
is touched.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import threading
import time
from dataclasses import dataclass, field

from agent.router.config import RouterConfig
from daemon.components.bootstrap import BootstrapComponent
from daemon.components.cni import CniComponent
from daemon.components.datastore import DatastoreComponent
from daemon.components.policy import PolicyComponent
from daemon.components.router import RouterComponent
from daemon.components.status import StatusComponent
from daemon.config import AgentConfig
from daemon.endpoints import HealthServer
from daemon.metrics import ComponentCollector, new_registry
from daemon.metrics_node import register_node_metrics
from daemon.supervisor import Supervisor
from daemon.threads import Threads
from datastore.etcd import EtcdClient, EtcdTLS

log = logging.getLogger(__name__)
RELOADABLE = frozenset({"log_level", "sync_period", "node_ip"})  # on SIGHUP; any other option takes a restart


def version() -> str:
    try:
        return importlib.metadata.version("podnet")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def tls_of(config: AgentConfig) -> EtcdTLS | None:
    if not config.etcd_tls:
        return None
    return EtcdTLS(config.etcd_ca_file, config.etcd_cert_file, config.etcd_key_file)


def etcd_client(config: AgentConfig) -> EtcdClient:
    return EtcdClient(list(config.etcd_endpoints), timeout=config.etcd_timeout, tls=tls_of(config))


def modes(config: AgentConfig) -> tuple[str, ...]:
    return tuple(
        name
        for name, on in (("router", config.run_router), ("firewall", config.run_firewall), ("cni", config.run_cni))
        if on
    )


@dataclass
class NodeAgent:
    config: AgentConfig
    client: EtcdClient
    threads: Threads = field(default_factory=Threads)
    exit_on_death: bool = True  # a dead component thread ends the process (status 70); tests keep it in

    def __post_init__(self) -> None:
        c = self.config
        self.started = threading.Event()  # every component started
        self.registry = registry = new_registry()
        self.supervisor = Supervisor([], self.threads, grace=30.0, exit_on_death=self.exit_on_death)
        self.http = HealthServer(
            self.supervisor.status, registry, self.threads, host=c.health_bind.host, port=c.health_bind.port
        )
        self.datastore = DatastoreComponent(self.client, self.threads)
        cache = self.datastore.cache
        self.status = StatusComponent(
            self.client,
            cache,
            c.node_name,
            self.threads,
            ttl=c.status_ttl,
            modes=modes(c),
            version=version(),
            supervisor_status=self.supervisor.status,
        )
        self.bootstrap = BootstrapComponent(self.client, cache, c, self.threads)
        self.status.problems = self.bootstrap.problems
        self.policy: PolicyComponent | None = None
        self.router: RouterComponent | None = None
        self.cni: CniComponent | None = None
        parts: list[object] = [self.http, self.datastore, self.status, self.bootstrap]
        if c.run_firewall:
            self.policy = PolicyComponent(
                cache,
                c.node_name,
                self.threads,
                netns=c.netns,
                backend=c.iptables_backend,
                sync_period=c.sync_period,
            )
            parts.append(self.policy)
        if c.run_router:
            runner_config = RouterConfig(
                node=c.node_name,
                workdir=c.workdir / "bgp",
                netns=c.netns,
                bgp_defaults=c.bgp_defaults,
                resync=c.sync_period,
                startup_grace=c.bgp_startup_grace,
                status_ttl=c.status_ttl,
                exabgp_log_level=c.exabgp_log_level,
                log_level=c.log_level,  # the daemon follows the cluster's level itself (SIGHUP, precedence)
                exabgp_reactor_speed=c.exabgp_reactor_speed,
                bridge_timeout=c.exabgp_bridge_timeout,
            )
            self.router = RouterComponent(
                self.client,
                cache,
                self.status.reporter,
                runner_config,
                self.threads,
                withdraw_on_exit=c.bgp_withdraw_on_exit,
            )
            parts.append(self.router)
        if c.run_cni:
            self.cni = CniComponent(c.cni_socket, self.threads, tls=tls_of(c), etcd_timeout=c.etcd_timeout,
                                    log_level=c.log_level)  # fmt: skip
            parts.append(self.cni)
        self.status.policy = self.policy
        self.status.router = self.router
        self.supervisor.add(*parts)  # type: ignore[arg-type]  # each keeps the Component protocol
        ComponentCollector(self.supervisor.status).register(registry)
        self._register_metrics()

    def _register_metrics(self) -> None:
        policy, router, cni = self.policy, self.router, self.cni
        register_node_metrics(
            self.registry,
            node=self.config.node_name,
            cache_of=lambda: self.datastore.cache,
            policy_of=None if policy is None else (lambda: policy.syncer),
            verdicts_of=None if policy is None else (lambda: policy.feed),
            commands_of=None if policy is None else (lambda: policy.runner.stats if policy.runner else None),
            routes_of=None if router is None else (lambda: router.runner.routes),
            links_of=None if router is None else (lambda: router.runner.links),
            speaker_of=None if router is None else (lambda: router.runner.speaker),
            cni_of=None if cni is None else cni.stats,
        )

    def reload(self, old: AgentConfig, new: AgentConfig) -> None:
        """Apply what can change at run time (``RELOADABLE``): the verify period and the node-IP method (the
        address is detected again at once). The log level is the caller's."""
        if new.sync_period != old.sync_period:
            if self.policy is not None and self.policy.syncer is not None:
                self.policy.syncer.resync_interval = new.sync_period
            if self.router is not None:
                runner = self.router.runner
                runner.config = dataclasses.replace(runner.config, resync=new.sync_period)
            log.info("sync period now %.0f s", new.sync_period)
        if new.node_ip != old.node_ip and self.bootstrap.watcher is not None:
            self.bootstrap.watcher.method = new.node_ip
            log.info("node IP method now %s: detecting again", new.node_ip.text)
            self.bootstrap.watcher.check()

    def start(self) -> None:
        started = time.monotonic()
        self.supervisor.start()
        self.started.set()
        log.info("podnet-agent %s started on %s (%s) in %.2f s", version(), self.config.node_name,
                 ", ".join(modes(self.config)) or "no modes", time.monotonic() - started)  # fmt: skip

    def stop(self) -> None:
        results = self.supervisor.stop()
        late = [f"{r.name} ({r.outcome})" for r in results if r.outcome != "stopped"]
        if late:
            log.warning("stopped; not cleanly: %s", ", ".join(late))
        else:
            log.info("stopped")
