"""Run modes like kube-router's: an agent with ``--no-run-firewall`` writes no chain, jump or ipset; with
``--no-run-router`` no route, tunnel device, BGP speaker or route status; with ``--no-run-cni`` no socket. Three
nodes, each with one mode off, all three agents ready, and each doing the other two jobs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from datastore import keys as k
from datastore import model as m
from datastore.etcd import EtcdClient
from datastore.store import Store
from testbed.etcd_server import EtcdServer
from testbed.netns import Netns
from testbed.wait import eventually
from tests.netns.agent_proc import AgentProc
from tests.netns.mesh import block_of, make_mesh

pytestmark = [pytest.mark.netns, pytest.mark.integration]
OFF = {"n1": "--no-run-firewall", "n2": "--no-run-router", "n3": "--no-run-cni"}
GRACE = ("--bgp-startup-grace", "5s")  # n2 runs no speaker: the others are ready with one peer of two after it


def _podnet_rules(ns: Netns) -> list[str]:
    out = []
    for tool in ("iptables-nft-save", "iptables-legacy-save"):
        out += [f"{tool}: {ln}" for ln in ns.run(tool).stdout.splitlines() if "podnet" in ln]
    out += [f"ipset: {ln}" for ln in ns.run("ipset", "list", "-n").stdout.splitlines() if ln.startswith("podnet")]
    return out


def _ns_pids(ns: Netns) -> list[str]:
    return subprocess.run(["ip", "netns", "pids", ns.name], capture_output=True, text=True, check=False).stdout.split()


def test_each_mode_off_touches_nothing_of_its_kind(
    netns_bed: object, etcd: EtcdClient, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    mesh = make_mesh(netns_bed, etcd, etcd_server, tmp_path, "vxlan")  # type: ignore[arg-type]
    store = Store(etcd)
    store.put(m.Namespace("default", {"kubernetes.io/metadata.name": "default"}))
    for name, pod in mesh.pods.items():
        store.put(m.Pod("default", pod.name, {"app": "x"}, (pod.ip,), name))
    agents = {
        name: AgentProc(name, mesh.nodes[name].ns.name, etcd_server.endpoint, tmp_path, flag, *GRACE)
        for name, flag in OFF.items()
    }
    try:
        for agent in agents.values():
            agent.start()
        for name, agent in agents.items():
            assert eventually(agent.ready, timeout=60), f"{name}: {agent.get('/readiness')[1]}\n{agent.log()}"
        ns = {name: mesh.nodes[name].ns for name in OFF}
        # n1 (no firewall): nothing in iptables or ipset, in either backend; routes and the CNI socket are there.
        assert eventually(lambda: f"{block_of(3)} via 10.244.3.1 dev vxlan.podnet onlink" in mesh.routes("n1"), 30)
        assert _podnet_rules(ns["n1"]) == []
        assert agents["n1"].cni_socket.exists()
        # n2 (no router): no route with our proto, no tunnel device, no speaker, no route or peer status.
        assert _podnet_rules(ns["n2"]) != []
        assert mesh.routes("n2") == []
        assert "vxlan.podnet" not in ns["n2"].ip("-o", "link", "show")
        assert _ns_pids(ns["n2"]) == [], "something runs in n2's namespace (a BGP speaker?)"
        assert etcd.get_prefix(k.routes_prefix("n2"))[0] == [] and etcd.get_prefix(k.bgp_status_prefix("n2"))[0] == []
        assert agents["n2"].cni_socket.exists()
        # n3 (no CNI server): no socket; rules and routes there.
        assert not agents["n3"].cni_socket.exists()
        assert _podnet_rules(ns["n3"]) != [] and mesh.routes("n3") != []
        # The metrics of a mode that is off are absent.
        assert "podnet_policy_sync_duration_seconds" not in agents["n1"].get("/metrics")[1]
        assert "podnet_bgp_peers" not in agents["n2"].get("/metrics")[1]
        assert "podnet_cni_requests_total" not in agents["n3"].get("/metrics")[1]
        assert "podnet_cni_requests_total" in agents["n1"].get("/metrics")[1]
    finally:
        for agent in agents.values():
            agent.close()
        mesh.close()
