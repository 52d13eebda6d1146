"""``podnet-agent cleanup --netns …`` removes what podnet made on a node (policy and nat chains, jumps, ipsets,
routes with podnet's proto, vxlan.podnet, the node's status keys in etcd) and nothing else: a kube-proxy- and
docker-like ruleset (in both iptables backends), a foreign ipset, foreign routes and devices are byte for byte as
before podnet started (counters aside). A second run finds nothing and succeeds."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.calc.routes import Route, VxlanDevice
from agent.dataplane.links import LinkWriter
from agent.dataplane.netlink import Netlink
from agent.dataplane.routes import RouteWriter
from agent.status import StatusPublisher
from datastore import keys as k
from datastore import model as m
from datastore.etcd import EtcdClient
from datastore.store import Store
from testbed.etcd_server import EtcdServer
from testbed.netns import Netns, NetnsBed
from testbed.procs import register_child, unregister_child
from testbed.wait import eventually
from tests.netns.test_dataplane_etcd import NODE, WEB_POLICY, put_pod, writer

pytestmark = [pytest.mark.netns, pytest.mark.integration]

# What a node running kube-proxy and docker holds (nft backend, where kubelet's hint chain says the node's rules are).
FOREIGN_NFT = """*mangle
:KUBE-IPTABLES-HINT - [0:0]
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:DOCKER - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m tcp --dport 443 -j DNAT --to-destination 192.168.77.11:6443
-A KUBE-POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-FIREWALL - [0:0]
-A INPUT -j KUBE-FIREWALL
-A FORWARD -m conntrack --ctstate NEW -j KUBE-SERVICES
-A OUTPUT -m conntrack --ctstate NEW -j KUBE-SERVICES
-A KUBE-FIREWALL -m set --match-set kube-foreign src -j DROP
-A KUBE-SERVICES -d 10.96.0.10/32 -p udp -m udp --dport 53 -j REJECT --reject-with icmp-port-unreachable
COMMIT
"""
# Docker's rules in the legacy backend (the other view must stay as it is too). It uses the nat table, as docker
# does: an x_tables table, once loaded in a namespace, stays loaded (empty) when its last rule goes.
FOREIGN_LEGACY = """*nat
:PREROUTING ACCEPT [0:0]
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A DOCKER-USER -j RETURN
COMMIT
"""


def agent_cli() -> str:
    found = shutil.which("podnet-agent", path=str(Path(sys.executable).parent))
    assert found, "podnet-agent is not installed in this environment"
    return found


def cleanup(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([agent_cli(), "cleanup", *args], capture_output=True, text=True, timeout=120, check=False)


def one_legacy_sync(endpoint: str, netns: str) -> None:
    """Leftovers of a run on the legacy backend (a node that switched backends): one full sync, then killed."""
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
    proc = subprocess.Popen(
        [*argv, "--iptables-backend", "legacy"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    register_child(proc.pid)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("synced ")
    finally:
        proc.kill()
        proc.communicate()
        unregister_child(proc.pid)


def snapshot(ns: Netns) -> dict[str, str]:
    def tidy(text: str) -> str:
        lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
        return "\n".join(re.sub(r"\[\d+:\d+\]", "[]", ln) for ln in lines)

    return {
        "iptables-nft-save": tidy(ns.run("iptables-nft-save").stdout),
        "iptables-legacy-save": tidy(ns.run("iptables-legacy-save").stdout),
        "ipset list": ns.run("ipset", "list").stdout,
        "ip route": ns.ip("route", "show", "table", "all"),
        "ip link": ns.ip("-o", "link", "show"),
        "ip addr": ns.ip("-o", "addr", "show"),
    }


def add_foreign_state(ns: Netns) -> None:
    ns.run("ipset", "create", "kube-foreign", "hash:ip")
    ns.run("ipset", "add", "kube-foreign", "198.51.100.7")
    proc = subprocess.run(
        ["ip", "netns", "exec", ns.name, "iptables-nft-restore", "--noflush"],
        input=FOREIGN_NFT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(
        ["ip", "netns", "exec", ns.name, "iptables-legacy-restore", "--noflush"],
        input=FOREIGN_LEGACY,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    ns.ip("link", "add", "br-foreign", "type", "bridge")
    ns.ip("link", "add", "veth-f0", "type", "veth", "peer", "name", "veth-f1")
    ns.ip("link", "set", "veth-f0", "master", "br-foreign")
    ns.ip("link", "set", "br-foreign", "up")
    ns.ip("addr", "add", "198.51.100.1/24", "dev", "br-foreign")
    ns.ip("route", "add", "203.0.113.0/24", "via", "198.51.100.9", "dev", "br-foreign", "onlink", "proto", "static")
    ns.ip("route", "add", "blackhole", "192.0.2.0/24", "proto", "boot")


def test_cleanup_removes_podnet_state_and_nothing_else(
    netns_bed: NetnsBed, etcd: EtcdClient, etcd_server: EtcdServer
) -> None:
    ul = netns_bed.underlay()
    node = netns_bed.node(NODE, ul, 11)
    web = netns_bed.pod(node, "nsa", "web", "10.244.0.2")  # a pod as the CNI plugin wires it (not the agent's)
    add_foreign_state(node.ns)
    # IPv6 link-local addresses (and their local routes) settle a moment after a link comes up: not ours to compare.
    assert eventually(lambda: not node.ns.ip("-6", "addr", "show", "tentative").strip(), timeout=10)
    before = snapshot(node.ns)

    store = Store(etcd)
    store.put(m.Node(NODE, node.ip))
    put_pod(store, web, {"app": "web"})
    store.put(m.Policy("nsa", "web", WEB_POLICY))
    store.put(m.IPPool("10.244.0.0/16", nat_outgoing=True))
    with writer(etcd_server.endpoint, node.ns.name) as w:
        assert "full" in w.next_sync()
    one_legacy_sync(etcd_server.endpoint, node.ns.name)
    nl = Netlink(node.ns.name)
    try:
        LinkWriter(nl).ensure_vxlan(VxlanDevice(4096, 4789, "66:0a:0b:0c:0d:0e", node.address, "10.244.0.0"))
        routes = {
            "10.244.0.0/26": Route("10.244.0.0/26", "local-block", blackhole=True),
            "10.244.1.0/26": Route("10.244.1.0/26", "remote-block", via="192.168.77.12"),
            "10.244.2.0/26": Route("10.244.2.0/26", "remote-block", via="10.244.2.0", dev="vxlan.podnet", onlink=True),
        }
        assert not RouteWriter(nl).apply(routes, in_sync=True).failed
    finally:
        nl.close()
    mine, other = StatusPublisher(etcd, NODE), StatusPublisher(etcd, "n2")
    try:
        for pub, cidr in ((mine, "10.244.0.0/26"), (other, "10.244.3.0/26")):
            pub.write_routes({cidr: m.RouteStatus(pub.node, cidr, "local-block")})
            pub.write_agent(m.AgentStatus(pub.node, in_sync=True))
        programmed = snapshot(node.ns)
        assert (
            "podnet-" in programmed["iptables-nft-save"] and "-j podnet-POSTROUTING" in programmed["iptables-nft-save"]
        )
        assert "-j podnet-FORWARD" in programmed["iptables-legacy-save"]
        assert "podnet-" in programmed["ipset list"] and "vxlan.podnet" in programmed["ip link"]
        assert "proto 80" in programmed["ip route"]

        first = cleanup("--netns", node.ns.name, "--node-name", NODE, "--etcd-endpoints", etcd_server.endpoint)
        assert first.returncode == 0, first.stderr
        after = snapshot(node.ns)
        for what in before:
            assert after[what] == before[what], f"{what} differs after cleanup"
        assert "removed chain legacy/filter/podnet-FORWARD" in first.stdout, first.stdout
        assert "removed route 10.244.1.0/26" in first.stdout and "removed device vxlan.podnet" in first.stdout

        # The node's status keys are gone; another node's, and the node's own record, are not.
        assert etcd.get_prefix(k.routes_prefix(NODE))[0] == []
        assert etcd.get(k.AgentStatusKey(NODE).path) is None
        assert [kv.key for kv in etcd.get_prefix(k.routes_prefix("n2"))[0]] != []
        assert etcd.get(k.AgentStatusKey("n2").path) is not None
        assert etcd.get(k.NodeKey(NODE).path) is not None

        second = cleanup("--netns", node.ns.name, "--node-name", NODE, "--etcd-endpoints", etcd_server.endpoint)
        assert second.returncode == 0, second.stderr
        assert second.stdout.strip() == "cleanup done: 0 object(s) removed"
        assert snapshot(node.ns) == before
    finally:
        mine.close(revoke=False)
        other.close()


def test_an_unknown_subcommand_is_refused() -> None:
    proc = subprocess.run([agent_cli(), "clean"], capture_output=True, text=True, timeout=30, check=False)
    assert (proc.returncode, proc.stderr.strip()) == (
        2,
        "podnet-agent: unknown command 'clean' (run, config, cleanup, version)",
    )
