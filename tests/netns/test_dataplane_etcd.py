"""The policy writer fed by the datastore (etcd → cache → compiler → writers), as a process: a NetworkPolicy in etcd
is enforced in the node namespace, a burst of 150 changes is coalesced into a few syncs that end in the final state,
a SIGKILLed writer restarts without rewriting anything, and a deleted policy leaves no chain or set behind."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from datastore import keys as k
from datastore import model as m
from datastore.etcd import EtcdClient
from datastore.store import Store
from testbed.etcd_server import EtcdServer
from testbed.netns import NetnsBed, Pod
from testbed.procs import register_child, unregister_child
from testbed.wait import eventually

pytestmark = [pytest.mark.netns, pytest.mark.integration]
NODE = "n1"
PORT = 8080


class Writer:
    """``python -m agent.dataplane.run --etcd … --netns …``: in the root namespace (etcd listens on its loopback),
    programming the node's namespace."""

    def __init__(self, endpoint: str, netns: str, env: dict[str, str] | None = None, log: Path | None = None) -> None:
        argv = [
            sys.executable,
            "-m",
            "agent.dataplane.run",
            "--etcd-endpoints",
            endpoint,
            "--node-name",
            NODE,
            "--netns",
            netns,
        ]
        with contextlib.ExitStack() as files:
            stderr = files.enter_context(log.open("a")) if log is not None else subprocess.DEVNULL
            self.proc = subprocess.Popen(
                [*argv, "--sync-period", "1", "--iptables-backend", "nft"],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                start_new_session=True,
                env={**os.environ, **(env or {})},
            )
        register_child(self.proc.pid)

    def next_sync(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("synced "), f"writer said {line!r} (exit {self.proc.poll()})"
        return line.strip()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        unregister_child(self.proc.pid)


@contextlib.contextmanager
def writer(endpoint: str, netns: str, env: dict[str, str] | None = None, log: Path | None = None) -> Iterator[Writer]:
    w = Writer(endpoint, netns, env, log)
    try:
        yield w
    finally:
        w.kill(signal.SIGTERM)


def put_pod(store: Store, pod: Pod, labels: dict[str, str]) -> None:
    store.put(m.Namespace(pod.namespace, {"kubernetes.io/metadata.name": pod.namespace}))
    store.put(m.Pod(pod.namespace, pod.name, labels, (pod.ip,), NODE))
    store.put(m.Endpoint(NODE, pod.namespace, pod.name, "eth0", pod.host_iface, (f"{pod.ip}/32",)))


WEB_POLICY = {
    "podSelector": {"matchLabels": {"app": "web"}},
    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}], "ports": [{"port": PORT}]}],
}


def test_policy_from_etcd_is_enforced_coalesced_restarted_and_removed(
    netns_bed: NetnsBed, etcd: EtcdClient, etcd_server: EtcdServer
) -> None:
    ul = netns_bed.underlay()
    node = netns_bed.node(NODE, ul, 11)
    a = netns_bed.pod(node, "nsa", "a", "10.244.0.2")
    b = netns_bed.pod(node, "nsa", "b", "10.244.0.3")
    c = netns_bed.pod(node, "nsb", "c", "10.244.0.4")
    b.ns.listen("tcp", PORT)
    store = Store(etcd)
    put_pod(store, a, {"app": "client"})
    put_pod(store, b, {"app": "web"})
    put_pod(store, c, {"app": "client"})  # a client, but of another namespace: the policy's podSelector is nsa only
    store.put(m.Policy("nsa", "web", WEB_POLICY))

    def ipset_members() -> str:
        return node.ns.run("ipset", "save").stdout

    with writer(etcd_server.endpoint, node.ns.name) as w:
        first = w.next_sync()
        assert "full" in first and not first.endswith("wrote=0")
        assert a.ns.connect("tcp", b.ip, PORT)
        assert not c.ns.connect("tcp", b.ip, PORT, timeout=0.3)

        # A burst: 150 more clients in nsa (on other nodes), written as fast as etcd takes them.
        for i in range(150):
            store.put(m.Pod("nsa", f"burst{i}", {"app": "client"}, (f"10.244.7.{i + 1}",), "n2"))
        assert eventually(lambda: "10.244.7.150" in ipset_members(), timeout=20)
        writes = 0  # syncs that wrote something, until one after convergence writes nothing
        while True:
            line = w.next_sync()
            if not line.endswith("wrote=0"):
                writes += 1
            elif "10.244.7.150" in ipset_members():
                break
        assert 1 <= writes < 75, f"150 changes took {writes} writing syncs: not coalesced"
        assert all(f"10.244.7.{i + 1}" in ipset_members() for i in range(150))
        w.kill()

    # Restarted after SIGKILL: adopts everything, writes nothing, enforcement never changed.
    with writer(etcd_server.endpoint, node.ns.name) as w:
        assert re.search(r"full .* wrote=0$", w.next_sync())
        assert a.ns.connect("tcp", b.ip, PORT)
        assert not c.ns.connect("tcp", b.ip, PORT, timeout=0.3)

        # The policy deleted: b is open again and the policy's chains and sets are gone after the cleanup.
        before = node.ns.run("iptables-nft-save").stdout
        assert "podnet-pi-" in before
        assert store.delete(k.PolicyKey("nsa", "web"))
        assert eventually(lambda: c.ns.connect("tcp", b.ip, PORT, timeout=0.3), timeout=10)
        after = node.ns.run("iptables-nft-save").stdout
        assert "podnet-pi-" not in after
        assert "10.244.7.1\n" not in ipset_members()
    node.ns.run(sys.executable, "-m", "agent.dataplane.run", "--remove", "--iptables-backend", "nft")
    assert "podnet" not in node.ns.run("iptables-nft-save").stdout
