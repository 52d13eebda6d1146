"""Fail closed in the kernel, under continuous probes (a new UDP flow every 10 ms, each datagram counted where it
lands): a pod whose endpoint arrives before its pod record gets nothing until the record arrives (and nothing
after, under a deny policy); without any policy it gets traffic within a second of its record; a policy whose
stored value is truncated with etcdctl keeps its pods isolated while it is broken."""

from __future__ import annotations

import time

import pytest

from datastore import keys as k
from datastore import model as m
from datastore.etcd import EtcdClient
from datastore.store import Store
from testbed.etcd_server import EtcdServer
from testbed.netns import NetnsBed, NodeNs, Pod
from testbed.wait import eventually
from tests.netns.test_dataplane_etcd import NODE, writer
from tests.netns.udp_flows import Arrivals, stream

pytestmark = [pytest.mark.netns, pytest.mark.integration]


def _records(pod: Pod, labels: dict[str, str]) -> tuple[m.Pod, m.Endpoint]:
    return (
        m.Pod(pod.namespace, pod.name, labels, (pod.ip,), NODE),
        m.Endpoint(NODE, pod.namespace, pod.name, "eth0", pod.host_iface, (f"{pod.ip}/32",)),
    )


def _node(netns_bed: NetnsBed, store: Store) -> NodeNs:
    ul = netns_bed.underlay()
    node = netns_bed.node(NODE, ul, 11)
    for ns in ("nsa", "nsb"):
        store.put(m.Namespace(ns, {"kubernetes.io/metadata.name": ns}))
    return node


def test_endpoint_before_pod_record_passes_nothing(
    netns_bed: NetnsBed, etcd: EtcdClient, etcd_server: EtcdServer
) -> None:
    store = Store(etcd)
    node = _node(netns_bed, store)
    client = netns_bed.pod(node, "nsb", "client", "10.244.0.2")
    pod, ep = _records(client, {"app": "client"})
    store.put(pod)
    store.put(ep)
    # Deny-all for app=web: only the pod record says web is one of them.
    store.put(m.Policy("nsa", "deny-web", {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"]}))
    with writer(etcd_server.endpoint, node.ns.name) as w:
        w.next_sync()
        # Under a deny-all ingress policy for app=web: the endpoint first, the pod record 2 s later: nothing, ever.
        web = netns_bed.pod(node, "nsa", "web", "10.244.0.3")
        arrivals = Arrivals(web)
        with stream(client, web):
            web_pod, web_ep = _records(web, {"app": "web"})
            store.put(web_ep)
            time.sleep(2)
            store.put(web_pod)
            time.sleep(2)
            assert arrivals.since(0) == 0, "a datagram reached a pod under deny-all"

        # Without any policy: nothing before the pod record, traffic within 1 s after it.
        open_pod = netns_bed.pod(node, "nsa", "open", "10.244.0.4")
        store.delete(k.PolicyKey("nsa", "deny-web"))
        arrivals = Arrivals(open_pod)
        with stream(client, open_pod):
            o_pod, o_ep = _records(open_pod, {"app": "open"})
            store.put(o_ep)
            time.sleep(2)
            assert arrivals.since(0) == 0, "a datagram reached a pod whose labels were not known"
            written = time.monotonic()
            store.put(o_pod)
            assert eventually(lambda: arrivals.since(written) > 0, timeout=5)
            first = min(t for t in arrivals.times if t >= written)
            assert first - written <= 1.0, f"traffic began {first - written:.2f} s after the pod record"


def test_truncated_policy_keeps_its_pods_isolated(
    netns_bed: NetnsBed, etcd: EtcdClient, etcd_server: EtcdServer
) -> None:
    store = Store(etcd)
    node = _node(netns_bed, store)
    client = netns_bed.pod(node, "nsb", "client", "10.244.0.2")
    web = netns_bed.pod(node, "nsa", "web", "10.244.0.3")
    for p, labels in ((client, {"app": "client"}), (web, {"app": "web"})):
        for obj in _records(p, labels):
            store.put(obj)
    deny = k.PolicyKey("nsa", "deny-web")
    store.put(m.Policy("nsa", "deny-web", {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"]}))
    with writer(etcd_server.endpoint, node.ns.name) as w:
        w.next_sync()
        arrivals = Arrivals(web)
        with stream(client, web):
            time.sleep(1)
            assert arrivals.since(0) == 0
            # An operator's etcdctl put cuts the value short: still nothing while it is broken.
            etcd_server.etcdctl("put", deny.path, '{"namespace": "nsa", "name": "deny-web", "spec": {"podSel')
            time.sleep(3)
            assert arrivals.since(0) == 0, "a truncated deny policy opened its pods"
            # Deleting it (the operator's other way out) opens the pod: the probes would have seen a leak.
            deleted = time.monotonic()
            store.delete(deny)
            assert eventually(lambda: arrivals.since(deleted) > 0, timeout=5)
