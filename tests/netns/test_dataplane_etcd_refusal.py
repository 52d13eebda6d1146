"""A policy the kernel refuses does not freeze the node's policy (the writer fed by etcd, as a process): the other
policies are written and keep being updated, the refused one is reported once (not on every sync) and its pods get
nothing it would have allowed; changing it retries it.

How the kernel is made to refuse it: the policy allows TCP and SCTP on 5432, and the writer runs with the test hook
``PODNET_TEST_MISSING_MATCH=sctp`` (agent/dataplane/run.py), which writes every rule that uses the sctp match with
the ipvs match instead, a match this kernel lacks. The kernel then refuses exactly the rules a kernel without the
optional xt_sctp module refuses (they exist: the match is a separate module, and minimal cloud kernels leave it
out), and only those; the policy, the compiler and the kernel's refusal are otherwise real."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from datastore import model as m
from datastore.etcd import EtcdClient
from datastore.store import Store
from testbed.etcd_server import EtcdServer
from testbed.netns import NetnsBed
from testbed.wait import eventually
from tests.netns.test_dataplane_etcd import PORT, WEB_POLICY, put_pod, writer

pytestmark = [pytest.mark.netns, pytest.mark.integration]
DB_PORT = 5432


def db_policy(*protocols: str) -> dict[str, object]:
    return {
        "podSelector": {"matchLabels": {"app": "db"}},
        "ingress": [
            {
                "from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                "ports": [{"protocol": p, "port": DB_PORT} for p in protocols],
            }
        ],
    }


def test_a_refused_policy_is_reported_once_and_the_others_keep_being_updated(
    netns_bed: NetnsBed, etcd: EtcdClient, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    ul = netns_bed.underlay()
    node = netns_bed.node("n1", ul, 11)
    a = netns_bed.pod(node, "nsa", "a", "10.244.0.2")
    b = netns_bed.pod(node, "nsa", "b", "10.244.0.3")
    c = netns_bed.pod(node, "nsb", "c", "10.244.0.4")
    d = netns_bed.pod(node, "nsa", "d", "10.244.0.5")
    b.ns.listen("tcp", PORT)
    d.ns.listen("tcp", DB_PORT)
    store = Store(etcd)
    put_pod(store, a, {"app": "client"})
    put_pod(store, b, {"app": "web"})
    put_pod(store, c, {"app": "client"})
    put_pod(store, d, {"app": "db"})
    store.put(m.Policy("nsa", "web", WEB_POLICY))
    store.put(m.Policy("nsa", "db", db_policy("TCP", "SCTP")))
    log = tmp_path / "writer.log"

    def logged(pattern: str) -> int:
        return len(re.findall(pattern, log.read_text()))

    with writer(etcd_server.endpoint, node.ns.name, env={"PODNET_TEST_MISSING_MATCH": "sctp"}, log=log) as w:
        assert "full" in w.next_sync()
        assert eventually(lambda: logged("policy nsa/db refused by the kernel") == 1, timeout=10)
        # "web" is enforced; "db" is held closed: a, a client, does not reach d on TCP 5432, which db allows.
        assert a.ns.connect("tcp", b.ip, PORT)
        assert not c.ns.connect("tcp", b.ip, PORT, timeout=0.3)
        assert not a.ns.connect("tcp", d.ip, DB_PORT, timeout=0.3)

        # Another policy changes while db stays refused: written within the usual time.
        web_and_nsb = {
            **WEB_POLICY,
            "ingress": [
                {
                    "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "nsb"}}}],
                    "ports": [{"port": PORT}],
                }
            ],
        }
        store.put(m.Policy("nsa", "web", web_and_nsb))
        assert eventually(lambda: c.ns.connect("tcp", b.ip, PORT, timeout=0.3), timeout=10)
        assert not a.ns.connect("tcp", d.ip, DB_PORT, timeout=0.3)

        # Several full resyncs later (--resync 1): reported once, not once per sync.
        full = 0
        while full < 3:
            full += "full" in w.next_sync()
        assert logged("policy nsa/db refused by the kernel") == 1
        assert logged(r"policy nsa/db rejected: refused by the kernel: .*ipvs") == 1
        assert logged("policy sync failed") == 0

        # The policy is changed to what this kernel can do: tried again, written, a reaches d.
        store.put(m.Policy("nsa", "db", db_policy("TCP")))
        assert eventually(lambda: a.ns.connect("tcp", d.ip, DB_PORT, timeout=0.3), timeout=10)
        assert not c.ns.connect("tcp", d.ip, DB_PORT, timeout=0.3)
        assert eventually(lambda: logged("policy nsa/db no longer rejected") == 1, timeout=5)
        assert logged("policy nsa/db changed: trying it in the kernel again") == 1
