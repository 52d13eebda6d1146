"""``podnet-agent cleanup``: remove everything podnet owns on the node, and nothing else.

What is podnet's is decided the way its writers decide it, by their own rules: chains and ipsets named
``podnet-*`` and the jumps to them (in every table; with ``auto``, in both iptables backends, since a node that
switched backends may hold leftovers in either), routes carrying ``ROUTE_PROTO``, the ``vxlan.podnet`` device (ours
by name), and, given a datastore, the node's lease-bound status keys (routes, BGP peers, the agent's own key).
Running it again finds nothing and succeeds.

``tunl0`` is left alone: the kernel makes it by itself in every namespace once the ``ipip`` module is loaded, cannot
delete it, and nothing on it tells whether podnet or someone else asked for it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from agent.dataplane.backend import BACKENDS, Backend, detect
from agent.dataplane.cmd import CommandError, CommandRunner
from agent.dataplane.ipset import IpsetError
from agent.dataplane.iptables import RestoreError
from agent.dataplane.links import LinkWriter
from agent.dataplane.netlink import Netlink
from agent.dataplane.programmer import PolicyDataplane
from agent.dataplane.render import OWNED_PREFIX, is_our_jump, parse_save
from agent.dataplane.routes import RouteWriter
from datastore import keys as k
from datastore.etcd import EtcdClient, EtcdTLS

log = logging.getLogger(__name__)


@dataclass
class CleanupResult:
    chains: list[str] = field(default_factory=list)  # "backend/table/chain"
    jumps: list[str] = field(default_factory=list)  # "backend/table/chain"
    sets: list[str] = field(default_factory=list)
    routes: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    status_keys: list[str] = field(default_factory=list)

    @property
    def removed(self) -> int:
        return sum(map(len, (self.chains, self.jumps, self.sets, self.routes, self.devices, self.status_keys)))


def _ours(runner: CommandRunner, backend: Backend) -> tuple[list[str], list[str]]:
    """The podnet chains and the built-in chains holding a podnet jump in ``backend``, as "table/chain" (none when
    its tools are missing or fail)."""
    proc = runner.run([backend.save], check=False)
    if proc.returncode != 0:
        return [], []
    chains: list[str] = []
    jumps: list[str] = []
    for table, view in sorted(parse_save(proc.stdout).items()):
        chains += [f"{table}/{c}" for c in sorted(view.chains)]
        jumps += [f"{table}/{c}" for c, rules in sorted(view.builtin.items()) if any(map(is_our_jump, rules))]
    return chains, jumps


def _our_sets(runner: CommandRunner) -> set[str]:
    proc = runner.run(["ipset", "list", "-n"], check=False)
    return {n for n in proc.stdout.split() if n.startswith(OWNED_PREFIX)} if proc.returncode == 0 else set()


def remove_policy(runner: CommandRunner, backend: str, result: CleanupResult) -> None:
    """Every podnet chain, jump and ipset. A backend without any of ours is not written to (an empty transaction
    would create tables there that were not); an ipset still referenced by the other backend's rules is destroyed
    on a second pass, once those rules are gone."""
    found = {n: _ours(runner, Backend(n)) for n in (BACKENDS if backend == "auto" else (backend,))}
    pending = [Backend(n) for n, (chains, jumps) in found.items() if chains or jumps]
    sets = _our_sets(runner)
    if not pending and sets:
        pending = [detect(runner, backend)]  # only sets left: the node's backend destroys them
    for attempt in (1, 2):
        failed: list[tuple[Backend, Exception]] = []
        for b in pending:
            try:
                PolicyDataplane(runner, b).remove_all()
            except (IpsetError, RestoreError, CommandError) as exc:
                failed.append((b, exc))
                continue
            chains, jumps = found.get(b.name, ([], []))
            result.chains += [f"{b.name}/{c}" for c in chains]
            result.jumps += [f"{b.name}/{j}" for j in jumps]
        if not failed:
            break
        if attempt == 2:
            raise failed[0][1]
        for b, why in failed:
            log.info("cleanup of %s: retrying once the other backend's rules are gone: %s", b.name, why)
        pending = [b for b, _ in failed]
    result.sets += sorted(sets - _our_sets(runner))


def remove_kernel_routes_and_devices(netns: str | None, result: CleanupResult) -> None:
    nl = Netlink(netns)
    try:
        result.routes += RouteWriter(nl).remove_all()
        if LinkWriter(nl).remove_vxlan():
            result.devices.append("vxlan.podnet")
    finally:
        nl.close()


def remove_status(client: EtcdClient, node: str, result: CleanupResult) -> None:
    """The node's status keys: its routes, its BGP peers' state, the agent's own key (others' stay)."""
    paths = [kv.key for p in (k.routes_prefix(node), k.bgp_status_prefix(node)) for kv in client.get_prefix(p)[0]]
    agent = k.AgentStatusKey(node).path
    if client.get(agent) is not None:
        paths.append(agent)
    for path in paths:
        if client.delete(path):
            result.status_keys.append(path)


def cleanup(
    netns: str | None = None,
    backend: str = "auto",
    node: str | None = None,
    etcd_endpoints: Sequence[str] = (),
    tls: EtcdTLS | None = None,
) -> CleanupResult:
    result = CleanupResult()
    remove_policy(CommandRunner(netns), backend, result)
    remove_kernel_routes_and_devices(netns, result)
    if node and etcd_endpoints:
        with EtcdClient(list(etcd_endpoints), tls=tls) as client:
            remove_status(client, node, result)
    return result
