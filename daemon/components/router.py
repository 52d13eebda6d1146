"""The router component: ``Router`` (route calculation, the link and route writers, the BGP speaker) on the
shared cache and status reporter. Ready after the first pass reached the kernel and BGP is up the way calico-node's
``-bird-ready`` means it (``Router.bgp_readiness``). Stopping keeps routes and devices; with
``withdraw=False`` (the default) BGP peers keep our routes through graceful restart."""

from __future__ import annotations

from agent.cache import Cache
from agent.router.config import RouterConfig
from agent.router.loop import Router
from agent.status import StatusReporter
from daemon.component import Health
from daemon.threads import Threads
from datastore.etcd import EtcdClient

LOOP_TIMEOUT = 60.0


class RouterComponent:
    name = "router"

    def __init__(
        self,
        client: EtcdClient,
        cache: Cache,
        reporter: StatusReporter,
        config: RouterConfig,
        threads: Threads,
        *,
        withdraw_on_exit: bool = False,
    ) -> None:
        self.threads = threads
        self.withdraw_on_exit = withdraw_on_exit
        self.runner = Router(client, config, cache=cache, reporter=reporter, publish_agent=False)

    def start(self) -> None:
        self.runner.start(spawn=lambda name, target: self.threads.spawn(self.name, name, target))

    def stop(self, deadline: float) -> None:
        self.threads.stopping(self.name)
        self.runner.stop(withdraw=self.withdraw_on_exit)

    def health(self) -> Health:
        r = self.runner
        progress = r.last_progress
        if r.applied_revision is None:
            view = r.agent_view
            why = view.problems[0] if view is not None and view.problems else "first pass not done"
            if not r.cache.in_sync.is_set():
                why = "waiting for the datastore"
            return Health(True, False, why, progress, LOOP_TIMEOUT)
        ready, why = r.bgp_readiness()
        return Health(True, ready, why, progress, LOOP_TIMEOUT)
