"""agentctl apply / get / policy explain|matrix|status against a real etcd, through click's CliRunner."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from agent.ctl.main import cli
from datastore import keys as k
from datastore import model as m
from datastore.etcd import EtcdClient
from datastore.store import Store
from testbed.etcd_server import EtcdServer

pytestmark = pytest.mark.integration

CLUSTER = textwrap.dedent(
    """
    apiVersion: v1
    kind: Namespace
    metadata: {name: nsa, labels: {app: nsa}}
    ---
    apiVersion: v1
    kind: Namespace
    metadata: {name: nsb, labels: {app: nsb}}
    ---
    apiVersion: v1
    kind: List
    items:
    - apiVersion: v1
      kind: Pod
      metadata: {name: a1, namespace: nsa, labels: {app: redis}}
      spec:
        nodeName: node1
        containers:
        - name: redis
          image: redis
          ports:
          - {name: redis, containerPort: 6379}
          - {containerPort: 9121}
      status: {podIP: 10.244.1.10, podIPs: [{ip: 10.244.1.10}]}
    - apiVersion: v1
      kind: Pod
      metadata: {name: b1, namespace: nsb, labels: {app: client}}
      spec: {nodeName: node2, containers: [{name: c, image: busybox}]}
      status: {podIP: 10.244.2.10}
    - apiVersion: v1
      kind: Pod
      metadata: {name: d1, labels: {app: web}}
      spec: {nodeName: node2, containers: [{name: c, image: nginx}]}
      status: {podIP: 10.244.2.11}
    """
)

# The seed's third example, as written there (extensions/v1beta1).
SEED_3 = textwrap.dedent(
    """
    apiVersion: extensions/v1beta1
    kind: NetworkPolicy
    metadata:
      name: npa
      namespace: nsa
    spec:
      podSelector: {}
      policyTypes:
      - Ingress
      ingress:
      - from:
        - namespaceSelector:
            matchLabels:
              app: nsb
        ports:
        - protocol: TCP
          port: 6379
    """
)


def run(server: EtcdServer, *args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(cli, ["--etcd-endpoints", server.endpoint, *args], input=stdin, catch_exceptions=False)


def apply_text(server: EtcdServer, text: str) -> Result:
    return run(server, "apply", "-f", "-", stdin=text)


def test_apply_writes_models_and_get_lists_them(etcd_server: EtcdServer, etcd: EtcdClient) -> None:
    res = apply_text(etcd_server, CLUSTER + "---\n" + SEED_3)
    assert res.exit_code == 0, res.output
    assert res.output.splitlines() == [
        "namespace nsa created",
        "namespace nsb created",
        "pod nsa/a1 created",
        "pod nsb/b1 created",
        "pod default/d1 created",
        "networkpolicy nsa/npa created",
    ]
    store = Store(etcd)
    pod = store.get(k.PodKey("nsa", "a1"), m.Pod)
    assert pod is not None
    assert pod.value == m.Pod("nsa", "a1", {"app": "redis"}, ("10.244.1.10",), "node1", (m.NamedPort("redis", 6379),))
    pol = store.get(k.PolicyKey("nsa", "npa"), m.Policy)
    assert pol is not None and pol.value.spec["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 6379}]

    again = apply_text(etcd_server, SEED_3.replace("6379", "6380"))
    assert again.output.strip() == "networkpolicy nsa/npa configured"
    same = apply_text(etcd_server, SEED_3.replace("6379", "6380"))
    assert same.output.strip() == "networkpolicy nsa/npa unchanged"

    pods = run(etcd_server, "get", "pods", "-n", "nsa")
    assert pods.exit_code == 0
    lines = pods.output.splitlines()
    assert [c.strip() for c in lines[0].split(" | ")] == ["NAMESPACE", "NAME", "IPS", "NODE", "LABELS", "NAMED PORTS"]
    assert len(lines) == 3 and "a1" in lines[2] and "redis:6379/TCP" in lines[2]
    nss = json.loads(run(etcd_server, "get", "ns", "-o", "json").output)
    assert {n["name"]: n["labels"] for n in nss} == {"nsa": {"app": "nsa"}, "nsb": {"app": "nsb"}}
    pols = run(etcd_server, "get", "netpol").output.splitlines()
    assert pols[2].split() == ["nsa", "|", "npa", "|", "<all>", "|", "Ingress", "|", "accepted"]


def test_invalid_document_writes_nothing(etcd_server: EtcdServer, etcd: EtcdClient) -> None:
    bad = CLUSTER + "---\n" + SEED_3.replace("port: 6379", "port: 70000")
    res = run(etcd_server, "apply", "-f", "-", stdin=bad)
    assert res.exit_code == 1
    assert "document 4: NetworkPolicy nsa/npa: spec.ingress[0].ports[0].port: 70000 is outside 1-65535" in res.output
    assert etcd.get_prefix(k.ROOT + "/")[0] == []

    res = apply_text(etcd_server, "apiVersion: v1\nkind: Service\nmetadata: {name: x}\n")
    assert res.exit_code == 1 and "kind 'Service' is not supported" in res.output
    res = apply_text(etcd_server, "kind: [unclosed\n")
    assert res.exit_code == 1 and "not valid YAML" in res.output
    res = apply_text(etcd_server, "apiVersion: v1\nkind: Pod\nmetadata: {name: Bad_Name}\n")
    assert res.exit_code == 1 and "document 1: metadata.name: 'Bad_Name' is not a valid" in res.output
    assert etcd.get_prefix(k.ROOT + "/")[0] == []


def test_explain_and_matrix(etcd_server: EtcdServer, etcd: EtcdClient) -> None:
    assert apply_text(etcd_server, CLUSTER + "---\n" + SEED_3).exit_code == 0
    # npa's namespaceSelector reads namespace labels, and namespace default has no record yet: its pod d1 gets no
    # traffic either way until the record arrives (fail closed), and explain says so.
    pending = run(etcd_server, "policy", "explain", "--from", "default/d1", "--to", "nsb/b1", "--port", "80")
    assert pending.output.splitlines() == [
        "DENIED: default/d1 -> nsb/b1 80/TCP",
        "  egress  default/d1: namespace record not yet known and a namespaceSelector needs its labels: no traffic"
        " in either direction until it arrives",
        "  ingress nsb/b1: not isolated (no policy selects it for ingress)",
    ]
    assert apply_text(etcd_server, "apiVersion: v1\nkind: Namespace\nmetadata: {name: default}\n").exit_code == 0
    ok = run(etcd_server, "policy", "explain", "--from", "nsb/b1", "--to", "nsa/a1", "--port", "6379/TCP")
    assert ok.exit_code == 0
    assert ok.output.splitlines() == [
        "ALLOWED: nsb/b1 -> nsa/a1 6379/TCP",
        "  egress  nsb/b1: not isolated (no policy selects it for egress)",
        "  ingress nsa/a1: isolated by nsa/npa; allowed by nsa/npa ingress rule 0",
    ]
    denied = run(etcd_server, "policy", "explain", "--from", "default/d1", "--to", "nsa/a1", "--port", "6379")
    assert denied.output.splitlines()[0] == "DENIED: default/d1 -> nsa/a1 6379/TCP"
    assert "no rule allows it" in denied.output
    js = json.loads(
        run(etcd_server, "policy", "explain", "--from", "nsb/b1", "--to", "nsa/a1", "--port", "80", "-o", "json").output
    )
    assert js["allowed"] is False and js["ingress"]["policies"] == ["nsa/npa"] and js["ingress"]["matched"] == []

    bad = run(etcd_server, "policy", "explain", "--from", "nsb/nope", "--to", "nsa/a1", "--port", "80")
    assert bad.exit_code == 1 and "no pod nsb/nope" in bad.output
    bad = run(etcd_server, "policy", "explain", "--from", "nsb/b1", "--to", "nsa/a1", "--port", "80/ICMP")
    assert bad.exit_code == 1 and "protocol must be" in bad.output

    table = run(etcd_server, "policy", "matrix", "--port", "6379/TCP").output.splitlines()
    assert [c.strip() for c in table[0].split(" | ")] == ["FROM \\ TO (6379/TCP)", "default/d1", "nsa/a1", "nsb/b1"]
    cells = {line.split(" | ")[0].strip(): [c.strip() for c in line.split(" | ")[1:]] for line in table[2:]}
    assert cells == {"default/d1": ["-", "no", "yes"], "nsa/a1": ["yes", "-", "yes"], "nsb/b1": ["yes", "yes", "-"]}
    mx = json.loads(run(etcd_server, "policy", "matrix", "-o", "json").output)
    assert mx["port"] == 80 and mx["allowed"]["nsb/b1"]["nsa/a1"] is False and mx["allowed"]["nsa/a1"]["nsb/b1"]


def test_status_lists_rejected_policies(etcd_server: EtcdServer, etcd: EtcdClient) -> None:
    assert apply_text(etcd_server, CLUSTER + "---\n" + SEED_3).exit_code == 0
    assert run(etcd_server, "policy", "status").output.strip() == "all 1 policy accepted"
    # The API server (or an older controller) may store what we refuse: write it past apply's validation.
    broken = m.Policy(
        "nsa", "broken", {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]}
    )
    Store(etcd).put(broken)
    out = run(etcd_server, "policy", "status").output.splitlines()
    assert [c.strip() for c in out[0].split(" | ")] == ["NAMESPACE", "NAME", "STATUS", "SELECTS", "REASON"]
    cells = [c.strip() for c in out[2].split(" | ")]
    assert cells[:4] == ["nsa", "broken", "rejected", "1 pods (Ingress)"]
    assert cells[4].startswith("spec.ingress[0].from[0].ipBlock.cidr: '10.0.0.0/33'")
    data = json.loads(run(etcd_server, "policy", "status", "--all", "-o", "json").output)
    assert [(d["name"], d["accepted"], d["selectedPods"]) for d in data] == [
        ("broken", False, ["nsa/a1"]),
        ("npa", True, ["nsa/a1"]),
    ]
    # The rejected policy isolates nsa (fails closed) even for what npa allows on other ports... and npa still works.
    v = json.loads(
        run(
            etcd_server, "policy", "explain", "--from", "nsb/b1", "--to", "nsa/a1", "--port", "6379", "-o", "json"
        ).output
    )
    assert v["allowed"] is True and v["ingress"]["rejected"] == ["nsa/broken"]


def test_delete_removes_what_the_manifest_names(etcd_server: EtcdServer, etcd: EtcdClient, tmp_path: Path) -> None:
    assert apply_text(etcd_server, CLUSTER + "---\n" + SEED_3).exit_code == 0
    # A policy stored past validation can still be deleted by name.
    Store(etcd).put(m.Policy("nsa", "broken", {"podSelector": {}, "ingress": [{"ports": [{"port": 0}]}]}))
    manifest = tmp_path / "del.yaml"
    manifest.write_text(SEED_3 + "---\n" + SEED_3.replace("name: npa", "name: broken").replace("6379", "0"))
    res = run(etcd_server, "delete", "-f", str(manifest))
    assert res.exit_code == 0, res.output
    assert res.output.splitlines() == ["networkpolicy nsa/npa deleted", "networkpolicy nsa/broken deleted"]
    assert run(etcd_server, "delete", "-f", str(manifest)).output.splitlines()[0] == "networkpolicy nsa/npa not found"
    assert etcd.get_prefix(k.POLICIES_PREFIX)[0] == []
    assert len(etcd.get_prefix(k.PODS_PREFIX)[0]) == 3
    missing = run(etcd_server, "apply", "-f", str(tmp_path / "nope.yaml"))
    assert missing.exit_code == 1 and "No such file or directory" in missing.output
