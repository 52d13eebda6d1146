"""The compiled thin client (``podnet-cni-client``, built by scripts/bootstrap from cni/client/podnet-cni.c) in real
network namespaces against a real server and etcd: pods get wired and talk, CHECK and DEL work, DEL leaves nothing;
without a server it hands over to the installed plugin; a server killed in the middle of an ADD gets the runtime a
"try again later" and the retry leaves nothing half-created; bad input gets the spec's error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from datastore import keys as k
from datastore import model as m
from datastore.etcd import EtcdClient
from datastore.store import Store
from ipam.check import check
from ipam.pools import add_pool
from testbed.etcd_server import EtcdServer
from testbed.netns import NetnsBed, cali_name
from testbed.procs import register_child, unregister_child
from testbed.wait import eventually
from tests.netns.test_cni import PLUGIN, Cni, add_two_pods_ping_and_delete, assert_nothing_left, cali_links

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]
CLIENT = os.environ.get("PODNET_CNI_CLIENT") or str(ROOT / ".venv" / "bin" / "podnet-cni-client")


class Server:
    """``podnet-cni serve`` on the bed's socket; restartable, killable."""

    def __init__(self, socket: str) -> None:
        self.socket = socket
        self.proc: subprocess.Popen[str] | None = None
        self.logs: list[str] = []

    def start(self) -> None:
        proc = subprocess.Popen(
            [PLUGIN, "serve", "--cni-socket", self.socket], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        register_child(proc.pid)
        self.proc = proc
        assert proc.stdout is not None and proc.stdout.readline().startswith("ready")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=10)
        self.logs.append(err)
        unregister_child(proc.pid)


@pytest.fixture
def cni(netns_bed: NetnsBed, etcd: EtcdClient, etcd_server: EtcdServer, tmp_path: Path) -> Cni:
    assert os.access(CLIENT, os.X_OK), f"{CLIENT} is missing: scripts/bootstrap builds it (gcc)"
    add_pool(Store(etcd), m.IPPool("10.244.0.0/16"))
    node = netns_bed.node("n1", netns_bed.underlay(), 11)
    return Cni(node, etcd_server.endpoint, str(tmp_path / "cni.sock"), client=(CLIENT,))


@pytest.fixture
def server(cni: Cni) -> Iterator[Server]:
    srv = Server(cni.socket)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def test_add_ping_check_del_through_the_server(cni: Cni, server: Server, netns_bed: NetnsBed, etcd: EtcdClient) -> None:
    add_two_pods_ping_and_delete(cni, netns_bed, etcd)
    server.stop()
    assert "ADD ctr-a -> 0" in server.logs[0] and "CHECK ctr-a -> 0" in server.logs[0]
    assert "DEL ctr-b -> 0" in server.logs[0]  # the server did the work, not a fallback


def test_without_a_server_it_hands_over_to_the_plugin(cni: Cni, netns_bed: NetnsBed, etcd: EtcdClient) -> None:
    assert not Path(cni.socket).exists()
    add_two_pods_ping_and_delete(cni, netns_bed, etcd)
    garbage = cni.call("ADD", netns_bed.netns("pc"), "ctr-c", "c", stdin=b"{not json")
    assert garbage.code == 1 and garbage.out["code"] == 6
    missing = cni.call("ADD", netns_bed.netns("pd"), "ctr-d", "d", env={"PODNET_CNI_FALLBACK": "/nonexistent/plugin"})
    assert missing.code == 1 and missing.out["code"] == 50 and "/nonexistent/plugin" in missing.out["msg"]
    assert_nothing_left(cni, etcd)


def test_bad_input_gets_spec_errors(cni: Cni, server: Server, netns_bed: NetnsBed, etcd: EtcdClient) -> None:
    pod = netns_bed.netns("pa")
    garbage = cni.call("ADD", pod, "ctr-a", "a", stdin=b"\x00\xff{not json")
    assert garbage.code == 1 and garbage.out["code"] == 6 and garbage.out["msg"]
    empty = cni.call("ADD", pod, "ctr-a", "a", stdin=b"")
    assert empty.code == 1 and empty.out["code"] == 6
    no_cid = cni.call("ADD", pod, "", "a")
    assert no_cid.code == 1 and no_cid.out["code"] == 4 and "CNI_CONTAINERID" in no_cid.out["msg"]
    no_cmd = cni.call("ADD", pod, "ctr-a", "a", env={"CNI_COMMAND": ""})
    assert no_cmd.code == 1 and no_cmd.out["code"] == 4
    assert_nothing_left(cni, etcd)


def test_server_killed_mid_add_then_the_retry_completes_it(
    cni: Cni, server: Server, netns_bed: NetnsBed, etcd: EtcdClient, tmp_path: Path
) -> None:
    """The server allocated the address and is stuck before the veth exists (the sandbox path is a FIFO, whose
    open blocks) when it is SIGKILLed: the client answers code 11 without redoing anything itself; the runtime's
    retry gets the same address, a complete attachment, and DEL leaves nothing."""
    peer = netns_bed.netns("peer")
    p = cni.call("ADD", peer, "ctr-p", "peer")
    assert p.code == 0, p.out
    stuck = tmp_path / "sandbox-fifo"
    os.mkfifo(stuck)
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "ctr-a", "CNI_NETNS": str(stuck), "CNI_IFNAME": "eth0",
           "CNI_ARGS": "K8S_POD_NAMESPACE=nsa;K8S_POD_NAME=a", "PATH": "/usr/bin:/bin",
           "PODNET_CNI_SOCKET": cni.socket, "PODNET_CNI_FALLBACK": PLUGIN}  # fmt: skip
    conf = tmp_path / "conf.json"
    conf.write_text(json.dumps(cni.conf()))
    with conf.open("rb") as stdin:
        call = subprocess.Popen([CLIENT], stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    register_child(call.pid)
    try:
        handle = k.HandleKey("k8s-pod-network.ctr-a")
        assert eventually(lambda: Store(etcd).get(handle, m.Handle) is not None, timeout=20)
        server.stop(signal.SIGKILL)
        out, err = call.communicate(timeout=20)
        assert b"podnet-cni:" in err
    finally:
        if call.poll() is None:
            call.kill()
            call.wait()
        unregister_child(call.pid)
    assert call.returncode == 1
    answer = json.loads(out)
    assert answer["code"] == 11 and cni.socket in answer["msg"], answer
    # Half done: an address and nothing else.
    held = Store(etcd).get(handle, m.Handle)
    assert held is not None
    assert cali_links(cni.node) == [cali_name("nsa", "peer")]
    assert Store(etcd).get(k.EndpointKey("n1", "nsa", "a", "eth0"), m.Endpoint) is None
    server.start()
    pa = netns_bed.netns("pa")
    again = cni.call("ADD", pa, "ctr-a", "a")
    assert again.code == 0, again.out
    assert again.out["ips"][0]["address"] == f"{held.value.ips[0]}/32"  # the same address, nothing allocated twice
    assert pa.ping(p.out["ips"][0]["address"].split("/")[0])
    assert check(etcd).ok
    assert cni.call("CHECK", pa, "ctr-a", "a").code == 0
    for pod, cid, name in ((pa, "ctr-a", "a"), (peer, "ctr-p", "peer")):
        assert cni.call("DEL", pod, cid, name).code == 0
    assert_nothing_left(cni, etcd)
