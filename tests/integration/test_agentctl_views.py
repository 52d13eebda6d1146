"""What operators look for with agentctl, against a real etcd: nodes and endpoints, which policies select a pod,
unreadable policies in `policy status`, `ipam release` refusing an address a live pod uses, `apply` of nothing."""

from __future__ import annotations

import json
import textwrap

import pytest
from click.testing import CliRunner, Result

from agent.ctl.main import cli
from datastore import keys as k
from datastore import model as m
from datastore.etcd import EtcdClient
from datastore.store import Store
from ipam.allocator import Ipam
from ipam.pools import add_pool
from testbed.etcd_server import EtcdServer

pytestmark = pytest.mark.integration


def run(server: EtcdServer, *args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(cli, ["--etcd-endpoints", server.endpoint, *args], input=stdin, catch_exceptions=False)


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.split(" | ")]


NODES = [
    m.Node("node1", "192.168.77.11/24", as_number=64512, vxlan_address="10.244.1.0", labels={"zone": "a"}),
    m.Node("node2", "192.168.77.12/24", rr_cluster_id="224.0.0.1"),
]
EPS = [
    m.Endpoint("node1", "nsa", "a1", "eth0", "cali1111111111a", ("10.244.1.10/32",), "ee:ee:ee:ee:ee:ee", "c0ffee" * 8),
    m.Endpoint("node2", "nsb", "b1", "eth0", "cali2222222222b", ("10.244.2.10/32",)),
    m.Endpoint("node2", "nsa", "a2", "eth0", "cali3333333333c", ("10.244.2.11/32",)),
]


def test_get_nodes_and_endpoints(etcd_server: EtcdServer, etcd: EtcdClient) -> None:
    store = Store(etcd)
    for obj in (*NODES, *EPS):
        store.put(obj)
    out = run(etcd_server, "get", "nodes").output.splitlines()
    assert cells(out[0]) == ["NAME", "ADDRESS", "AS", "RR-CLUSTER-ID", "IPIP-TUNNEL", "VXLAN-TUNNEL", "LABELS"]
    assert [cells(x) for x in out[2:]] == [
        ["node1", "192.168.77.11/24", "64512", "-", "-", "10.244.1.0", "zone=a"],
        ["node2", "192.168.77.12/24", "-", "224.0.0.1", "-", "-", "<none>"],
    ]
    assert json.loads(run(etcd_server, "get", "nodes", "-o", "json").output) == [n.to_json() for n in NODES]
    assert json.loads(run(etcd_server, "get", "no", "--node", "node2", "-o", "json").output) == [NODES[1].to_json()]

    out = run(etcd_server, "get", "endpoints").output.splitlines()
    assert cells(out[0]) == ["NODE", "NAMESPACE", "POD", "IFACE", "HOST-IFACE", "IPS", "MAC", "CONTAINER"]
    assert [cells(x) for x in out[2:]] == [
        ["node1", "nsa", "a1", "eth0", "cali1111111111a", "10.244.1.10/32", "ee:ee:ee:ee:ee:ee", "c0ffeec0ffee"],
        ["node2", "nsa", "a2", "eth0", "cali3333333333c", "10.244.2.11/32", "-", "-"],
        ["node2", "nsb", "b1", "eth0", "cali2222222222b", "10.244.2.10/32", "-", "-"],
    ]
    node2 = json.loads(run(etcd_server, "get", "endpoints", "--node", "node2", "-o", "json").output)
    assert node2 == [EPS[2].to_json(), EPS[1].to_json()]
    only = json.loads(run(etcd_server, "get", "ep", "--node", "node2", "-n", "nsb", "-o", "json").output)
    assert only == [EPS[1].to_json()]
    bad = run(etcd_server, "get", "endpoints", "--node", "no/such")
    assert bad.exit_code == 1 and bad.output.startswith("Error: invalid node name")


POLICIES = textwrap.dedent(
    """
    apiVersion: v1
    kind: Namespace
    metadata: {name: nsa}
    ---
    apiVersion: v1
    kind: Pod
    metadata: {name: a1, namespace: nsa, labels: {app: db}}
    spec: {nodeName: node1, containers: [{name: c, image: x}]}
    status: {podIP: 10.244.1.10}
    ---
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: db-in, namespace: nsa}
    spec: {podSelector: {matchLabels: {app: db}}, ingress: [{from: [{podSelector: {}}]}]}
    ---
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: all-out, namespace: nsa}
    spec: {podSelector: {}, policyTypes: [Ingress, Egress], egress: [{}]}
    ---
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: web-only, namespace: nsa}
    spec: {podSelector: {matchLabels: {app: web}}, policyTypes: [Egress]}
    """
)


def test_which_policies_select_a_pod(etcd_server: EtcdServer, etcd: EtcdClient) -> None:
    store = Store(etcd)
    for ep in EPS:
        store.put(ep)
    assert run(etcd_server, "apply", "-f", "-", stdin=POLICIES).exit_code == 0
    res = run(etcd_server, "policy", "explain", "--pod", "nsa/a1")
    assert res.exit_code == 0, res.output
    assert res.output.splitlines() == [
        "nsa/a1 on node1 (10.244.1.10)",
        "  ingress isolated by nsa/all-out, nsa/db-in",
        "  egress  isolated by nsa/all-out",
    ]
    js = json.loads(run(etcd_server, "policy", "explain", "--pod", "nsa/a1", "-o", "json").output)
    assert js["pending"] is None and js["egress"]["policies"] == ["nsa/all-out"]
    # a2 has an endpoint on node2 but its pod record has not arrived: it gets nothing, whatever selects it.
    res = run(etcd_server, "policy", "explain", "--pod", "nsa/a2")
    assert res.output.splitlines() == [
        "nsa/a2 on node2 (10.244.2.11)",
        "  pod record not yet known: no traffic in either direction until it arrives",
    ]
    js = json.loads(run(etcd_server, "policy", "explain", "--pod", "nsa/a2", "-o", "json").output)
    assert js["pending"].startswith("pod record not yet known") and js["ingress"]["isolated"] is True
    # A pod known by nothing (no record, no endpoint) is an error.
    res = run(etcd_server, "policy", "explain", "--pod", "nsa/zz")
    assert res.exit_code == 1 and "no pod nsa/zz" in res.output
    res = run(etcd_server, "policy", "explain", "--pod", "nsa/a1", "--port", "80")
    assert res.exit_code == 2 and "either --pod, or --from, --to and --port" in res.output
    # A policy the compiler rejects is named with its reason.
    store.put(m.Policy("nsa", "bad", {"podSelector": {}, "ingress": [{"ports": [{"port": 0}]}]}))
    lines = run(etcd_server, "policy", "explain", "--pod", "nsa/a1").output.splitlines()
    assert lines[1] == "  ingress isolated by nsa/all-out, nsa/bad, nsa/db-in"
    assert lines[2].startswith("          nsa/bad is rejected and allows nothing: spec.ingress[0].ports[0].port")


def test_policy_status_lists_an_unreadable_policy(etcd_server: EtcdServer, etcd: EtcdClient) -> None:
    assert run(etcd_server, "apply", "-f", "-", stdin=POLICIES).exit_code == 0
    assert run(etcd_server, "policy", "status").output.strip() == "all 3 policies accepted"
    # A user (or a broken writer) stores a truncated value, as etcdctl lets anyone do.
    etcd_server.etcdctl("put", f"{k.POLICIES_PREFIX}nsa/truncated", '{"namespace": "nsa", "name": "trunc')
    res = run(etcd_server, "policy", "status")
    assert res.exit_code == 0, res.output
    out = res.output.splitlines()
    assert cells(out[0]) == ["NAMESPACE", "NAME", "STATUS", "SELECTS", "REASON"]
    assert len(out) == 3
    row = cells(out[2])
    assert row[:4] == ["nsa", "truncated", "rejected", "1 pods (Ingress, Egress)"]
    assert "not valid JSON" in row[4]
    data = json.loads(run(etcd_server, "policy", "status", "-o", "json").output)
    assert [(d["name"], d["accepted"], d["selectedPods"]) for d in data] == [("truncated", False, ["nsa/a1"])]
    pols = [cells(x) for x in run(etcd_server, "get", "policies").output.splitlines()[2:]]
    assert ["nsa", "truncated", "<unreadable>", "Ingress,Egress", "unreadable"] in pols
    # The pod it isolates says so; mending the value ends it.
    lines = run(etcd_server, "policy", "explain", "--pod", "nsa/a1").output.splitlines()
    assert any(x.strip().startswith("nsa/truncated is rejected and allows nothing: stored value") for x in lines)
    etcd_server.etcdctl("del", f"{k.POLICIES_PREFIX}nsa/truncated")
    assert run(etcd_server, "policy", "status").output.strip() == "all 3 policies accepted"


def test_release_refuses_an_address_a_live_endpoint_uses(etcd_server: EtcdServer, etcd: EtcdClient) -> None:
    store = Store(etcd)
    add_pool(store, m.IPPool("10.244.0.0/16"))
    ipam = Ipam(etcd)
    ip = ipam.auto_assign("h-a", "node1", pod="nsa/a1")
    store.put(m.Endpoint("node1", "nsa", "a1", "eth0", "cali1111111111a", (f"{ip}/32",), handle="h-a"))
    res = run(etcd_server, "ipam", "release", "--ip", ip)
    assert res.exit_code == 1
    assert res.output == (
        f"Error: {ip} is in use by pod nsa/a1 (node node1, cali1111111111a): not released"
        " (--force releases it anyway)\n"
    )
    other = ipam.auto_assign("h-b", "node1", pod="nsa/b1")
    assert other != ip  # still allocated to a1
    res = run(etcd_server, "ipam", "release", "--ip", ip, "--force")
    assert (res.exit_code, res.output) == (0, f"released {ip} (handle h-a)\n")
    # An address no endpoint uses is released without --force.
    assert run(etcd_server, "ipam", "release", "--ip", other).output == f"released {other} (handle h-b)\n"
    # The same for a whole handle: by the addresses it holds, or by the endpoint naming it.
    store.delete(k.EndpointKey("node1", "nsa", "a1", "eth0"))  # a1 is gone, its address free for the next pod
    third = ipam.auto_assign("h-c", "node1", pod="nsa/c1")
    store.put(m.Endpoint("node1", "nsa", "c1", "eth0", "cali4444444444d", (f"{third}/32",)))
    res = run(etcd_server, "ipam", "release", "--handle", "h-c")
    assert (res.exit_code, res.output) == (
        1,
        "Error: handle h-c is in use by pod nsa/c1 (node node1, cali4444444444d): not released"
        " (--force releases it anyway)\n",
    )
    store.put(m.Endpoint("node1", "nsa", "c1", "eth0", "cali4444444444d", ("10.244.9.9/32",), handle="h-c"))
    assert run(etcd_server, "ipam", "release", "--handle", "h-c").exit_code == 1
    res = run(etcd_server, "ipam", "release", "--handle", "h-c", "--force")
    assert (res.exit_code, res.output) == (0, f"released {third} from h-c\n")


@pytest.mark.parametrize("text", ["", "\n", "---\n", "# nothing here\n---\n---\n"])
@pytest.mark.parametrize("verb", ["apply", "delete"])
def test_apply_of_nothing_says_so(etcd_server: EtcdServer, etcd: EtcdClient, verb: str, text: str) -> None:
    res = run(etcd_server, verb, "-f", "-", stdin=text)
    assert (res.exit_code, res.output) == (
        1,
        "Error: no objects in standard input: it is empty or holds only empty documents\n",
    )
    assert etcd.get_prefix(k.ROOT + "/")[0] == []
