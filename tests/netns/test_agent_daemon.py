"""``podnet-agent`` in node namespaces, as an operator judges it: readiness that waits for BGP ("bgp: 0 of 2 peers
established"), metrics that pass ``promtool check metrics`` and count the writer's calls, SIGTERM and SIGKILL with a
restart under continuous probes (nothing allowed lost, nothing denied passes, the kernel untouched while it is
away, no BGP flap on the other nodes), and ``agentctl status`` of a running and of a gone agent."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from datastore import model as m
from datastore.etcd import EtcdClient
from datastore.store import Store
from testbed.etcd_server import EtcdServer
from testbed.netns import NetnsBed, Pod
from testbed.wait import eventually
from tests.netns.agent_proc import AgentProc
from tests.netns.mesh import Mesh, block_of, make_mesh, wait_for
from tests.netns.test_agent_cleanup import snapshot
from tests.netns.udp_flows import Arrivals, stream

pytestmark = [pytest.mark.netns, pytest.mark.integration]
NAMES = ("n1", "n2", "n3")


def _agentctl(endpoint: str, node: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.ctl.main", "--etcd-endpoints", endpoint, "--node-name", node, *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def _restore_calls(agent: AgentProc) -> float:
    code, text = agent.get("/metrics")
    assert code == 200, text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "podnet_dataplane_command_total" and sample.labels.get("tool") == "iptables-restore":
                return sample.value
    raise AssertionError("no podnet_dataplane_command_total{tool=iptables-restore} in /metrics")


def _cluster(bed: NetnsBed, etcd: EtcdClient, server: EtcdServer, tmp: Path) -> tuple[Mesh, dict[str, Pod]]:
    """Three nodes (VXLAN mesh) with a pod each; on n1 also a web server pod, an allowed and a denied client, all
    with pod records; a policy lets only app=good reach app=web."""
    mesh = make_mesh(bed, etcd, server, tmp, "vxlan")
    store = Store(etcd)
    store.put(m.Namespace("default", {"kubernetes.io/metadata.name": "default"}))
    for name, pod in mesh.pods.items():
        store.put(m.Pod("default", pod.name, {"app": "web" if name == "n1" else "other"}, (pod.ip,), name))
    n1 = mesh.nodes["n1"]
    pods = {"web": mesh.pods["n1"]}
    for i, role in ((3, "good"), (4, "bad")):
        pod = bed.pod(n1, "default", role, f"10.244.1.{i}")
        store.put(m.Pod("default", role, {"app": role}, (pod.ip,), "n1"))
        store.put(m.Endpoint("n1", "default", role, "eth0", pod.host_iface, ips=(f"{pod.ip}/32",)))
        pods[role] = pod
    store.put(m.Policy("default", "web-from-good", {
        "podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "good"}}}]}],
    }))  # fmt: skip
    return mesh, pods


def _no_loss(seqs: list[int]) -> tuple[int, int]:
    """(datagrams expected between the first and last seen, missing ones)."""
    if not seqs:
        return 0, 0
    span = max(seqs) - min(seqs) + 1
    return span, span - len(set(seqs))


def test_agent_ready_metrics_restarts_and_status(
    netns_bed: NetnsBed, etcd: EtcdClient, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    mesh, pods = _cluster(netns_bed, etcd, etcd_server, tmp_path)
    agents = {
        name: AgentProc(name, mesh.nodes[name].ns.name, etcd_server.endpoint, tmp_path, "--sync-period", "20s")
        for name in NAMES
    }
    n1 = agents["n1"]
    try:
        # Readiness waits for BGP: n1 alone is not ready, and says why.
        n1.start()
        assert eventually(lambda: "bgp: 0 of 2 peers established" in n1.get("/readiness")[1], timeout=30), n1.log()
        code, body = n1.get("/readiness")
        assert code == 503 and body.startswith("not ready: router"), body
        assert n1.get("/healthz")[0] == 200
        for name in ("n2", "n3"):
            agents[name].start()
        for name, agent in agents.items():
            assert eventually(agent.ready, timeout=60), f"{name}: {agent.get('/readiness')[1]}\n{agent.log()}"
        assert "bgp: 2 of 2 peers established" in n1.get("/readiness")[1]
        wait_for(lambda: f"{block_of(1)} via 10.244.1.1 dev vxlan.podnet onlink" in mesh.routes("n2"), 30,
                 "n1's block on n2", mesh)  # fmt: skip

        # Metrics: valid exposition, and the writer's restore calls counted.
        code, text = n1.get("/metrics")
        assert code == 200
        check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
                               timeout=60, check=False)  # fmt: skip
        assert check.returncode == 0, check.stdout + check.stderr
        for name in ("podnet_component_ready", "podnet_bgp_peers", "podnet_routes_programmed",
                     "podnet_policy_sync_duration_seconds", "process_resident_memory_bytes"):  # fmt: skip
            assert f"\n{name}" in text or text.startswith(name), name
        before = _restore_calls(n1)
        # A second policy for n1's web pod (it opens TCP 9999 to the bad client; the UDP probes stay denied).
        Store(etcd).put(m.Policy("default", "web-admin", {
            "podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "bad"}}}],
                         "ports": [{"protocol": "TCP", "port": 9999}]}],
        }))  # fmt: skip
        assert eventually(lambda: _restore_calls(n1) > before, timeout=10), "no iptables-restore counted"

        # agentctl status of a running agent: readiness, policy and route sync, the peer table.
        def status_ready() -> bool:
            out = _agentctl(etcd_server.endpoint, "n1", "status").stdout
            return "readiness: ready" in out and out.count("Established") == 2

        assert eventually(status_ready, timeout=15), _agentctl(etcd_server.endpoint, "n1", "status").stdout
        out = _agentctl(etcd_server.endpoint, "n1", "status").stdout
        assert "modes: router, firewall, cni" in out and "policy: revision " in out and "routes: revision " in out

        # Restarts under continuous probes: the allowed client loses nothing, the denied one gets nothing through,
        # the kernel is left exactly as it was while the agent is away, and the other nodes keep n1's routes.
        arrivals = Arrivals(pods["web"])
        with stream(pods["good"], pods["web"]), stream(pods["bad"], pods["web"]):
            assert eventually(lambda: len(arrivals.from_(pods["good"].ip)) > 20, timeout=10), "no allowed traffic"
            for how in ("SIGTERM", "SIGKILL"):
                kernel = snapshot(mesh.nodes["n1"].ns)
                if how == "SIGTERM":
                    assert n1.terminate() == 0, n1.log()
                else:
                    n1.kill()
                    # Its ExaBGP and bridge die with it: nothing of ours is left running in the node namespace.
                    assert eventually(lambda: not _ns_pids(mesh, "n1"), timeout=10), _ns_pids(mesh, "n1")
                    # And so does its CNI server (a child process in the agent's own namespace).
                    assert eventually(lambda: not _running_with(str(n1.cni_socket)), timeout=10)
                down = time.monotonic()
                if how == "SIGTERM":
                    gone = _agentctl(etcd_server.endpoint, "n1", "status")
                    assert gone.returncode == 1 and "not running" in gone.stdout, gone.stdout + gone.stderr
                time.sleep(3)
                assert snapshot(mesh.nodes["n1"].ns) == kernel, f"the kernel changed while the agent was away ({how})"
                assert f"{block_of(1)} via 10.244.1.1 dev vxlan.podnet onlink" in mesh.routes("n2"), how
                n1.start()
                assert eventually(n1.ready, timeout=60), n1.get("/readiness")[1] + n1.log()
                assert snapshot(mesh.nodes["n1"].ns) == kernel, f"the restarted agent rewrote the kernel ({how})"
                time.sleep(1)
                span, missing = _no_loss(arrivals.from_(pods["good"].ip, since=down - 1))
                assert span > 300 and missing == 0, f"{how}: {missing} of {span} allowed datagrams lost"
            assert arrivals.from_(pods["bad"].ip) == [], "a denied datagram reached the pod"
        arrivals.proc.kill()

        # The agent gone for good: agentctl says so.
        assert n1.terminate() == 0
        gone = _agentctl(etcd_server.endpoint, "n1", "status")
        assert gone.returncode == 1 and "not running" in gone.stdout, gone.stdout
    finally:
        for agent in agents.values():
            agent.close()
        mesh.close()


def _ns_pids(mesh: Mesh, node: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "pids", mesh.nodes[node].ns.name], capture_output=True, text=True,
                         check=False).stdout  # fmt: skip
    return out.split()


def _running_with(text: str) -> list[int]:
    """PIDs whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
    return found
