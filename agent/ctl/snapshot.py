"""The snapshot agentctl's policy answers are computed over: read straight from etcd at one revision (no watcher),
decoded the way the agent's cache decodes its watch streams.

A policy key whose value cannot be read is kept as ``Snapshot.broken_policies`` with the reason, as the cache keeps
the watcher's ``Malformed`` policies, so the compiler fails closed on it here exactly as on the node."""

from __future__ import annotations

import logging
from typing import TypeVar

from agent.calc.snapshot import Snapshot
from datastore import codec
from datastore import keys as k
from datastore import model as m
from datastore.etcd import EtcdClient
from datastore.fields import ModelError
from datastore.keys import InvalidKey

log = logging.getLogger(__name__)

T = TypeVar("T")


class _Reader:
    def __init__(self, client: EtcdClient) -> None:
        self.client = client
        self.revision = client.revision()
        self.broken_policies: dict[tuple[str, str], str] = {}

    def list(self, prefix: str, cls: type[T]) -> list[T]:
        kvs, _ = self.client.get_prefix(prefix, self.revision)
        out: list[T] = []
        for kv in kvs:
            try:
                out.append(codec.decode_as(kv.key, kv.value, cls))
            except (ModelError, InvalidKey) as exc:
                self._malformed(kv.key, str(exc))
        return out

    def _malformed(self, path: str, reason: str) -> None:
        try:
            key = k.parse_key(path)
        except InvalidKey:
            key = None
        if isinstance(key, k.PolicyKey):
            self.broken_policies[(key.namespace, key.name)] = reason
        else:
            log.warning("skipping malformed value at %s: %s", path, reason)


def load_snapshot(client: EtcdClient) -> Snapshot:
    """Pods, namespaces, policies (readable or not), endpoints and nodes, all read at one etcd revision."""
    r = _Reader(client)
    nodes = r.list(k.NODES_PREFIX, m.Node)
    pods = r.list(k.PODS_PREFIX, m.Pod)
    namespaces = r.list(k.NAMESPACES_PREFIX, m.Namespace)
    policies = r.list(k.POLICIES_PREFIX, m.Policy)
    endpoints = r.list(k.ENDPOINTS_PREFIX, m.Endpoint)
    return Snapshot(
        revision=r.revision,
        in_sync=True,
        nodes={n.name: n for n in nodes},
        pods={(p.namespace, p.name): p for p in pods},
        namespaces={n.name: n for n in namespaces},
        policies={(p.namespace, p.name): p for p in policies},
        endpoints={(e.node, e.namespace, e.pod, e.iface): e for e in endpoints},
        broken_policies=r.broken_policies,
    )
