"""`agentctl status` and `agentctl routes` reading what agents published in a real etcd."""

from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

from agent.ctl.main import cli
from agent.status import StatusPublisher
from datastore import model as m
from datastore.etcd import EtcdClient
from testbed.etcd_server import EtcdServer

pytestmark = pytest.mark.integration


def run(server: EtcdServer, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--etcd-endpoints", server.endpoint, "--node-name", "n1", *args])
    return result.exit_code, result.output


def test_status_shows_the_peer_table_identity_and_sync(etcd: EtcdClient, etcd_server: EtcdServer) -> None:
    code, out = run(etcd_server, "status")
    assert code == 1
    assert "podnet agent on n1 is not running" in out

    pub = StatusPublisher(etcd, "n1")
    try:
        pub.publish_agent(m.AgentStatus("n1", True, 42, "192.168.77.11", 64512, since="2026-11-23T01:02:03.4+00:00"))
        pub.publish_peers(
            {
                "192.168.77.13": m.BGPPeerStatus(
                    "n1", "192.168.77.13", "node-to-node mesh", "Active", info="Connection refused"
                ),
                "192.168.77.12": m.BGPPeerStatus(
                    "n1", "192.168.77.12", "node-to-node mesh", "Established", since="2026-11-23T01:02:04.5+00:00"
                ),
                "192.168.77.2": m.BGPPeerStatus("n1", "192.168.77.2", "global", "Invalid", info="bad AS"),
            }
        )
        code, out = run(etcd_server, "status")
        assert code == 0, out
        lines = out.splitlines()
        assert lines[0] == "podnet agent on n1: datastore in sync (revision 42), since 2026-11-23 01:02:03"
        assert lines[1] == "AS number 64512, router ID 192.168.77.11"
        header = next(i for i, line in enumerate(lines) if line.startswith("PEER ADDRESS"))
        rows = [[c.strip() for c in line.split("|")] for line in lines[header + 2 :]]
        assert rows == [
            ["192.168.77.2", "global", "Invalid", "", "bad AS"],
            ["192.168.77.12", "node-to-node mesh", "Established", "2026-11-23 01:02:04", ""],
            ["192.168.77.13", "node-to-node mesh", "Active", "", "Connection refused"],
        ]
        code, out = run(etcd_server, "status", "-o", "json")
        doc = json.loads(out)
        assert doc["running"] and doc["agent"]["inSync"] and doc["agent"]["routerID"] == "192.168.77.11"
        assert [p["state"] for p in doc["peers"]] == ["Invalid", "Established", "Active"]
    finally:
        pub.close()


def test_status_shows_readiness_modes_and_policy_and_route_sync_then_that_the_agent_is_gone(
    etcd: EtcdClient, etcd_server: EtcdServer
) -> None:
    pub = StatusPublisher(etcd, "n1")
    agent = m.AgentStatus(
        "n1",
        True,
        57,
        "192.168.77.11",
        64512,
        since="2026-11-23T01:02:03.4+00:00",
        ready=False,
        not_ready=("bgp: 0 of 2 peers established", "policy: first apply not done"),
        modes=("router", "firewall", "cni"),
        policy_revision=None,
        routes_revision=55,
        rejected_policies=("nsa/deny-all: podSelector: bad label value",),
        version="0.4.0",
    )
    try:
        pub.publish_agent(agent)
        pub.publish_peers(
            {"192.168.77.12": m.BGPPeerStatus("n1", "192.168.77.12", "node-to-node mesh", "Connect")},
        )
        code, out = run(etcd_server, "status")
        assert code == 0, out
        assert out.splitlines()[:9] == [
            "podnet agent on n1: datastore in sync (revision 57), since 2026-11-23 01:02:03",
            "AS number 64512, router ID 192.168.77.11",
            "readiness: NOT ready: bgp: 0 of 2 peers established; policy: first apply not done",
            "modes: router, firewall, cni",
            "policy: nothing applied yet",
            "routes: revision 55 of 57",
            "version: 0.4.0",
            "rejected policy: nsa/deny-all: podSelector: bad label value",
            "",
        ]
        assert "192.168.77.12 | node-to-node mesh | Connect" in out

        # Ready, the firewall off: policy sync says so.
        pub.publish_agent(
            dataclasses.replace(
                agent, ready=True, not_ready=(), modes=("router", "cni"), routes_revision=57, rejected_policies=()
            )
        )
        code, out = run(etcd_server, "status")
        assert code == 0, out
        assert out.splitlines()[2:6] == [
            "readiness: ready",
            "modes: router, cni",
            "policy: off",
            "routes: revision 57 of 57",
        ]
        doc = json.loads(run(etcd_server, "status", "-o", "json")[1])
        assert doc["running"] is True
        assert {
            key: doc["agent"][key] for key in ("ready", "notReady", "modes", "policyRevision", "routesRevision")
        } == {
            "ready": True,
            "notReady": [],
            "modes": ["router", "cni"],
            "policyRevision": None,
            "routesRevision": 57,
        }
        assert doc["agent"]["rejectedPolicies"] == [] and doc["agent"]["version"] == "0.4.0"
        assert [p["state"] for p in doc["peers"]] == ["Connect"]
    finally:
        pub.close(revoke=True)  # the agent is gone: its lease and every key bound to it

    code, out = run(etcd_server, "status")
    assert code == 1
    assert out.splitlines() == [
        "podnet agent on n1 is not running (no status in etcd: its lease has ended, or it never ran)."
    ]
    code, out = run(etcd_server, "status", "-o", "json")
    assert code == 1 and json.loads(out) == {"node": "n1", "running": False, "agent": None, "peers": []}


def test_routes_lists_every_node_or_one(etcd: EtcdClient, etcd_server: EtcdServer) -> None:
    pubs = [StatusPublisher(etcd, n) for n in ("n1", "n2")]
    try:
        pubs[0].publish_routes(
            {
                "10.244.1.0/26": m.RouteStatus("n1", "10.244.1.0/26", "local-block"),
                "10.244.2.0/26": m.RouteStatus(
                    "n1", "10.244.2.0/26", "remote-block", "10.244.0.2", "vxlan.podnet", "vxlan", "192.168.77.12"
                ),
            }
        )
        pubs[1].publish_routes({"10.244.2.0/26": m.RouteStatus("n2", "10.244.2.0/26", "local-block")})
        code, out = run(etcd_server, "routes")
        assert code == 0
        rows = [[c.strip() for c in line.split("|")] for line in out.splitlines()[2:]]
        assert rows == [
            ["n1", "10.244.1.0/26", "local-block", "-", "-", "none", "-"],
            ["n1", "10.244.2.0/26", "remote-block", "10.244.0.2", "vxlan.podnet", "vxlan", "192.168.77.12"],
            ["n2", "10.244.2.0/26", "local-block", "-", "-", "none", "-"],
        ]
        code, out = run(etcd_server, "routes", "--node", "n2", "-o", "json")
        assert [(r["node"], r["cidr"]) for r in json.loads(out)] == [("n2", "10.244.2.0/26")]
    finally:
        for p in pubs:
            p.close()
