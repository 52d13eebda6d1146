"""podnet-cni in real network namespaces against a real etcd: pods get wired and talk, DEL leaves nothing, bad
input gets the spec's error and leaves nothing, CHECK/STATUS/GC/VERSION behave."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from datastore import keys as k
from datastore import model as m
from datastore.etcd import EtcdClient
from datastore.store import Store
from ipam.check import check
from ipam.pools import add_pool
from testbed.etcd_server import EtcdServer
from testbed.netns import Netns, NetnsBed, NodeNs, cali_name
from testbed.procs import register_child, unregister_child
from testbed.wait import eventually

pytestmark = pytest.mark.netns

PLUGIN = str(Path(sys.executable).parent / "podnet-cni")  # the installed console script
# The same client as a standalone script, started the lean way (no site, no package): how a node installs it.
LEAN = [sys.executable, "-I", "-S", str(Path(__file__).resolve().parents[2] / "cni" / "main.py")]


@dataclass
class Call:
    code: int
    out: Any
    stderr: str


@dataclass
class Cni:
    node: NodeNs
    endpoint: str
    socket: str
    client: tuple[str, ...] = (PLUGIN,)

    def conf(self, **extra: Any) -> dict[str, Any]:
        return {
            "cniVersion": "1.0.0",
            "name": "podnet",
            "type": "podnet-cni",
            "etcdEndpoints": [self.endpoint],
            "nodeName": self.node.name,
            "mtu": 1400,
            "hostNetns": f"/var/run/netns/{self.node.ns.name}",
            **extra,
        }

    def call(self, command: str, pod: Netns | None = None, cid: str = "", name: str = "", *, stdin: bytes | None = None,
             conf: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> Call:  # fmt: skip
        environ = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command, "CNI_IFNAME": "eth0",
                   "CNI_PATH": "/opt/cni/bin", "PODNET_CNI_SOCKET": self.socket,
                   "PODNET_CNI_FALLBACK": PLUGIN}  # fmt: skip
        if cid:
            environ["CNI_CONTAINERID"] = cid
        if pod is not None:
            environ["CNI_NETNS"] = f"/var/run/netns/{pod.name}"
        if name:
            environ["CNI_ARGS"] = f"IgnoreUnknown=1;K8S_POD_NAMESPACE=nsa;K8S_POD_NAME={name}"
        environ.update(env or {})
        data = stdin if stdin is not None else json.dumps(conf or self.conf()).encode()
        proc = subprocess.run(list(self.client), input=data, env=environ, capture_output=True, timeout=60, check=False)
        out = json.loads(proc.stdout) if proc.stdout.strip() else None
        return Call(proc.returncode, out, proc.stderr.decode())


@pytest.fixture
def cni(netns_bed: NetnsBed, etcd: EtcdClient, etcd_server: EtcdServer, tmp_path: Path) -> Cni:
    add_pool(Store(etcd), m.IPPool("10.244.0.0/16"))
    underlay = netns_bed.underlay()
    node = netns_bed.node("n1", underlay, 11)
    return Cni(node, etcd_server.endpoint, str(tmp_path / "cni.sock"))


@pytest.fixture
def server(cni: Cni) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [PLUGIN, "serve", "--cni-socket", cni.socket], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    register_child(proc.pid)
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("ready")
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        unregister_child(proc.pid)


def cali_links(node: NodeNs) -> list[str]:
    out = node.ns.ip("-o", "link", "show")
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ": cali" in line]


def podnet_routes(node: NodeNs) -> list[str]:
    return [r.strip() for r in node.ns.ip("route", "show", "proto", "80").splitlines() if r.strip()]


def assert_nothing_left(cni: Cni, etcd: EtcdClient) -> None:
    assert cali_links(cni.node) == []
    assert podnet_routes(cni.node) == []
    assert etcd.get_prefix(k.ENDPOINTS_PREFIX)[0] == []
    assert etcd.get_prefix(k.HANDLES_PREFIX)[0] == []
    assert all(not v.value.allocations for v in Store(etcd).list(k.BLOCKS_PREFIX, m.Block))


def add_two_pods_ping_and_delete(cni: Cni, netns_bed: NetnsBed, etcd: EtcdClient) -> None:
    pa, pb = netns_bed.netns("pa"), netns_bed.netns("pb")
    a = cni.call("ADD", pa, "ctr-a", "a")
    assert a.code == 0, a.out
    b = cni.call("ADD", pb, "ctr-b", "b")
    assert b.code == 0, b.out
    ip_a, ip_b = a.out["ips"][0]["address"].split("/")[0], b.out["ips"][0]["address"].split("/")[0]
    assert a.out["cniVersion"] == "1.0.0" and a.out["ips"][0]["gateway"] == "169.254.1.1"
    assert a.out["interfaces"][0]["name"] == cali_name("nsa", "a")
    assert a.out["interfaces"][1] == {
        "name": "eth0",
        "mac": a.out["interfaces"][1]["mac"],
        "sandbox": f"/var/run/netns/{pa.name}",
    }
    assert ip_a != ip_b
    # Through the cali veths and the node: proxy ARP for 169.254.1.1, /32 routes.
    assert pa.ping(ip_b, count=2)
    assert pb.ping(ip_a, count=2)
    assert sorted(podnet_routes(cni.node)) == sorted(
        [f"{ip_a} dev {cali_name('nsa', 'a')} scope link", f"{ip_b} dev {cali_name('nsa', 'b')} scope link"]
    )
    host_if = cali_name("nsa", "a")
    assert cni.node.ns.run("sysctl", "-n", f"net.ipv4.conf.{host_if}.proxy_arp").stdout.strip() == "1"
    assert cni.node.ns.run("sysctl", "-n", f"net.ipv4.neigh.{host_if}.proxy_delay").stdout.strip() == "0"
    assert "mtu 1400" in pa.ip("link", "show", "eth0")
    assert pa.ip("-4", "route", "show").split("\n")[0].strip() == "default via 169.254.1.1 dev eth0"
    ep = Store(etcd).get(k.EndpointKey("n1", "nsa", "a", "eth0"), m.Endpoint)
    assert ep is not None
    assert ep.value.ips == (f"{ip_a}/32",) and ep.value.container_id == "ctr-a"
    assert ep.value.handle == "k8s-pod-network.ctr-a" and ep.value.host_iface == host_if
    assert check(etcd).ok
    assert cni.call("CHECK", pa, "ctr-a", "a").code == 0
    # A repeated ADD (runtime retry) keeps the same address.
    again = cni.call("ADD", pa, "ctr-a", "a")
    assert again.code == 0 and again.out["ips"] == a.out["ips"]
    assert pa.ping(ip_b)
    for pod, cid, name in ((pa, "ctr-a", "a"), (pb, "ctr-b", "b")):
        assert cni.call("DEL", pod, cid, name).code == 0
        assert cni.call("DEL", pod, cid, name).code == 0  # idempotent
    assert_nothing_left(cni, etcd)


def test_add_ping_del_one_shot(cni: Cni, netns_bed: NetnsBed, etcd: EtcdClient) -> None:
    """No server listening: the plugin process does the work itself."""
    add_two_pods_ping_and_delete(cni, netns_bed, etcd)


def test_add_ping_del_through_the_server(
    cni: Cni, server: subprocess.Popen[str], netns_bed: NetnsBed, etcd: EtcdClient
) -> None:
    cni.client = tuple(LEAN)
    add_two_pods_ping_and_delete(cni, netns_bed, etcd)
    server.terminate()
    _, err = server.communicate(timeout=10)
    assert "ADD ctr-a -> 0" in err and "DEL ctr-b -> 0" in err  # the thin client handed the work over


def test_bad_input_gets_spec_errors_and_leaves_nothing(cni: Cni, netns_bed: NetnsBed, etcd: EtcdClient) -> None:
    pod = netns_bed.netns("pa")
    garbage = cni.call("ADD", pod, "ctr-a", "a", stdin=b"\x00{not json")
    assert garbage.code == 1 and garbage.out["code"] == 6 and garbage.out["msg"]
    no_cid = cni.call("ADD", pod, "", "a")
    assert no_cid.code == 1 and no_cid.out["code"] == 4 and "CNI_CONTAINERID" in no_cid.out["msg"]
    no_netns = cni.call("ADD", None, "ctr-a", "a")
    assert no_netns.code == 1 and no_netns.out["code"] == 4 and "CNI_NETNS" in no_netns.out["msg"]
    no_cmd = cni.call("ADD", pod, "ctr-a", "a", env={"CNI_COMMAND": ""})
    assert no_cmd.out["code"] == 4
    old = cni.call("ADD", pod, "ctr-a", "a", conf=cni.conf(cniVersion="0.1.0"))
    assert old.out["code"] == 1
    bad_mtu = cni.call("ADD", pod, "ctr-a", "a", conf=cni.conf(mtu="big"))
    assert bad_mtu.out["code"] == 7 and "mtu" in bad_mtu.out["msg"]
    # Fails after the address was allocated (the sandbox does not exist): everything is rolled back.
    gone = cni.call("ADD", None, "ctr-a", "a", env={"CNI_NETNS": "/var/run/netns/does-not-exist"})
    assert gone.code == 1 and gone.out["code"] == 101, gone.out
    # etcd unreachable: try again later; STATUS says unavailable.
    down = cni.call("ADD", pod, "ctr-a", "a", conf=cni.conf(etcdEndpoints=["127.0.0.1:1"]))
    assert down.out["code"] == 11
    assert cni.call("STATUS", conf=cni.conf(etcdEndpoints=["127.0.0.1:1"])).out["code"] == 50
    assert_nothing_left(cni, etcd)
    assert check(etcd).ok


def test_exhausted_pool_is_a_clean_error(cni: Cni, netns_bed: NetnsBed, etcd: EtcdClient) -> None:
    etcd.delete_prefix(k.POOLS_PREFIX)
    add_pool(Store(etcd), m.IPPool("10.250.0.0/30", block_size=30))
    pods = [netns_bed.netns(f"p{i}") for i in range(5)]
    for i in range(4):
        assert cni.call("ADD", pods[i], f"ctr-{i}", f"p{i}").code == 0
    full = cni.call("ADD", pods[4], "ctr-4", "p4")
    assert full.code == 1 and full.out["code"] == 100 and "exhausted" in full.out["msg"]
    assert len(cali_links(cni.node)) == 4
    assert Store(etcd).get(k.HandleKey("k8s-pod-network.ctr-4"), m.Handle) is None
    for i in range(4):
        assert cni.call("DEL", pods[i], f"ctr-{i}", f"p{i}").code == 0
    assert_nothing_left(cni, etcd)


def test_check_status_gc_version(cni: Cni, netns_bed: NetnsBed, etcd: EtcdClient) -> None:
    version = cni.call("VERSION", stdin=b"")
    assert version.code == 0 and "1.0.0" in version.out["supportedVersions"]
    assert cni.call("STATUS", conf=cni.conf(cniVersion="1.1.0")).code == 0
    cni.client = tuple(LEAN)  # standalone and no server: it hands over to the installed plugin
    assert cni.call("STATUS", conf=cni.conf(cniVersion="1.1.0")).code == 0
    lean_error = cni.call("STATUS", conf=cni.conf(etcdEndpoints=["127.0.0.1:1"]))
    assert lean_error.code == 1 and lean_error.out["code"] == 50
    cni.client = (PLUGIN,)
    pa, pb = netns_bed.netns("pa"), netns_bed.netns("pb")
    assert cni.call("ADD", pa, "ctr-a", "a").code == 0
    b = cni.call("ADD", pb, "ctr-b", "b")
    assert b.code == 0
    ip_b = b.out["ips"][0]["address"]
    cni.node.ns.ip("route", "del", ip_b, "proto", "80")
    broken = cni.call("CHECK", pb, "ctr-b", "b")
    assert broken.code == 1 and broken.out["code"] == 102 and "no route" in broken.out["details"]
    gc_conf = cni.conf(
        cniVersion="1.1.0", **{"cni.dev/valid-attachments": [{"containerID": "ctr-a", "ifname": "eth0"}]}
    )
    assert cni.call("GC", conf=gc_conf).code == 0
    assert cali_links(cni.node) == [cali_name("nsa", "a")]
    assert Store(etcd).get(k.HandleKey("k8s-pod-network.ctr-b"), m.Handle) is None
    assert Store(etcd).get(k.EndpointKey("n1", "nsa", "b", "eth0"), m.Endpoint) is None
    assert cni.call("CHECK", pa, "ctr-a", "a").code == 0
    assert cni.call("DEL", pa, "ctr-a", "a").code == 0
    assert_nothing_left(cni, etcd)
    assert eventually(lambda: check(etcd).ok, timeout=1)


def test_new_sandbox_of_a_pod_replaces_the_old_one(cni: Cni, netns_bed: NetnsBed, etcd: EtcdClient) -> None:
    """A pod's sandbox is recreated (same pod, new container): the new ADD takes over the cali name, and the
    runtime's late DEL of the old container releases only the old address."""
    old_ns, new_ns, peer = netns_bed.netns("old"), netns_bed.netns("new"), netns_bed.netns("peer")
    assert cni.call("ADD", peer, "ctr-p", "peer").code == 0
    old = cni.call("ADD", old_ns, "ctr-old", "web")
    new = cni.call("ADD", new_ns, "ctr-new", "web")
    assert old.code == 0 and new.code == 0
    ip_new = new.out["ips"][0]["address"].split("/")[0]
    assert cni.call("DEL", old_ns, "ctr-old", "web").code == 0
    assert Store(etcd).get(k.HandleKey("k8s-pod-network.ctr-old"), m.Handle) is None
    ep = Store(etcd).get(k.EndpointKey("n1", "nsa", "web", "eth0"), m.Endpoint)
    assert ep is not None and ep.value.container_id == "ctr-new"
    assert peer.ping(ip_new)
    assert check(etcd).ok
    for pod, cid, name in ((new_ns, "ctr-new", "web"), (peer, "ctr-p", "peer")):
        assert cni.call("DEL", pod, cid, name).code == 0
    assert_nothing_left(cni, etcd)


def test_requested_address(cni: Cni, netns_bed: NetnsBed, etcd: EtcdClient) -> None:
    """The `IP` CNI arg and the `ips` capability get exactly that address, or a clean error if it is taken."""
    pa, pb, pc = netns_bed.netns("pa"), netns_bed.netns("pb"), netns_bed.netns("pc")
    a = cni.call("ADD", pa, "ctr-a", env={"CNI_ARGS": "K8S_POD_NAMESPACE=nsa;K8S_POD_NAME=a;IP=10.244.7.7"})
    assert a.code == 0 and a.out["ips"][0]["address"] == "10.244.7.7/32"
    taken = cni.call("ADD", pb, "ctr-b", env={"CNI_ARGS": "K8S_POD_NAMESPACE=nsa;K8S_POD_NAME=b;IP=10.244.7.7"})
    assert taken.code == 1 and taken.out["code"] == 7 and "already allocated" in taken.out["msg"]
    c = cni.call("ADD", pc, "ctr-c", "c", conf=cni.conf(runtimeConfig={"ips": ["10.244.7.9/32"]}))
    assert c.code == 0 and c.out["ips"][0]["address"] == "10.244.7.9/32"
    assert pa.ping("10.244.7.9")
    assert set(cali_links(cni.node)) == {cali_name("nsa", "a"), cali_name("nsa", "c")}  # nothing left of b
    for pod, cid, name in ((pa, "ctr-a", "a"), (pb, "ctr-b", "b"), (pc, "ctr-c", "c")):
        assert cni.call("DEL", pod, cid, name).code == 0
    assert_nothing_left(cni, etcd)
