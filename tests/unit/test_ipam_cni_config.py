"""The CNI plugin's input parsing (spec error codes) and the thin client's lean import path."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cni.config import parse_conf, parse_env
from cni.errors import DECODE_FAILURE, INCOMPATIBLE_VERSION, INVALID_CONFIG, INVALID_ENV, CniError
from cni.link import host_ifname, pod_mac
from cni.plugin import run

ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc", "CNI_NETNS": "/var/run/netns/x", "CNI_IFNAME": "eth0"}
CONF = {"cniVersion": "1.0.0", "name": "podnet", "type": "podnet-cni", "etcdEndpoints": ["127.0.0.1:2379"]}


def code_of(env: dict[str, str], stdin: bytes) -> int:
    outcome = run(env, stdin)
    assert outcome.code == 1
    err = json.loads(outcome.stdout)
    assert err["msg"] and err["cniVersion"]
    return int(err["code"])


@pytest.mark.parametrize(
    ("env", "conf", "code"),
    [
        ({**ENV, "CNI_COMMAND": "FROB"}, CONF, INVALID_ENV),
        ({k: v for k, v in ENV.items() if k != "CNI_CONTAINERID"}, CONF, INVALID_ENV),
        ({**ENV, "CNI_CONTAINERID": "../etc"}, CONF, INVALID_ENV),
        ({**ENV, "CNI_IFNAME": "a-very-long-interface-name"}, CONF, INVALID_ENV),
        ({**ENV, "CNI_NETNS": "relative"}, CONF, INVALID_ENV),
        ({**ENV, "CNI_ARGS": "K8S_POD_NAME"}, CONF, INVALID_ENV),
        ({**ENV, "CNI_ARGS": "IP=10.0.0.300"}, CONF, INVALID_ENV),
        (ENV, {**CONF, "cniVersion": "0.2.0"}, INCOMPATIBLE_VERSION),
        (ENV, {**CONF, "etcdEndpoints": []}, INVALID_CONFIG),
        (ENV, {**CONF, "mtu": 20}, INVALID_CONFIG),
        (ENV, {**CONF, "pool": "10.244.0.1/16"}, INVALID_CONFIG),
        (ENV, {**CONF, "nodeName": "bad/name"}, INVALID_CONFIG),
        (ENV, {k: v for k, v in CONF.items() if k != "name"}, INVALID_CONFIG),
    ],
)
def test_bad_input_gets_the_spec_code(env: dict[str, str], conf: dict[str, object], code: int) -> None:
    assert code_of(env, json.dumps(conf).encode()) == code


def test_garbage_stdin_is_a_decode_failure() -> None:
    assert code_of(ENV, b"\xff\xfe garbage") == DECODE_FAILURE
    assert code_of(ENV, b"[1, 2]") == DECODE_FAILURE


def test_version_needs_no_config() -> None:
    out = run({"CNI_COMMAND": "VERSION"}, b"")
    assert out.code == 0
    assert json.loads(out.stdout) == {"cniVersion": "1.1.0", "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]}


def test_parsing() -> None:
    env = parse_env({**ENV, "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=nsa;K8S_POD_NAME=web-0;IP=10.244.0.9"})
    assert (env.pod_namespace, env.pod_name, env.requested_ip) == ("nsa", "web-0", "10.244.0.9")
    bare = parse_env(ENV)
    assert (bare.pod_namespace, bare.pod_name) == ("cni", "abc")  # no Kubernetes args: named by container ID
    conf = parse_conf({**CONF, "runtimeConfig": {"ips": ["10.244.0.7/32"]}, "mtu": 1400}, {"PODNET_NODE_NAME": "n9"})
    assert (conf.node_name, conf.mtu, conf.runtime_ips) == ("n9", 1400, ("10.244.0.7",))
    with pytest.raises(CniError):
        parse_conf({**CONF, "cni.dev/valid-attachments": [{"containerID": 1}]}, {})


def test_names() -> None:
    assert host_ifname("nsa", "a") == "cali" + hashlib.sha1(b"nsa.a").hexdigest()[:11]
    assert len(host_ifname("nsa", "a")) == 15
    mac = pod_mac("abc")
    first = int(mac.split(":")[0], 16)
    assert first & 0x02 and not first & 0x01  # locally administered, unicast
    assert pod_mac("abc") == mac != pod_mac("abd")


def test_thin_client_imports_no_grpc() -> None:
    probe = "import sys, cni.main; print(sorted(m for m in ('grpc', 'pyetcd', 'datastore.etcd') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_sample_conflist_is_accepted() -> None:
    conflist = json.loads((Path(__file__).resolve().parents[2] / "deploy/cni/10-podnet.conflist").read_text())
    plugin = {**conflist["plugins"][0], "name": conflist["name"], "cniVersion": conflist["cniVersion"]}
    conf = parse_conf(plugin, {"PODNET_NODE_NAME": "n1"})
    assert conf.mtu == 1450 and conf.etcd_endpoints == ("10.96.232.136:2379",) and conf.host_netns is None


def test_etcd_tls_files_from_the_network_config_else_the_callers_variables() -> None:
    files = {"etcdCAFile": "/tls/ca.pem", "etcdCertFile": "/tls/c.pem", "etcdKeyFile": "/tls/c.key"}
    conf = parse_conf({**CONF, **files}, {"PODNET_ETCD_CA_FILE": "/env/ca.pem"})
    assert (conf.etcd_ca_file, conf.etcd_cert_file, conf.etcd_key_file) == ("/tls/ca.pem", "/tls/c.pem", "/tls/c.key")
    conf = parse_conf(CONF, {"PODNET_ETCD_CA_FILE": "/env/ca.pem"})
    assert (conf.etcd_ca_file, conf.etcd_cert_file, conf.etcd_key_file) == ("/env/ca.pem", None, None)
    assert parse_conf(CONF, {}).etcd_ca_file is None
    for bad in ({"etcdCAFile": "ca.pem"}, {"etcdKeyFile": "/tls/c.key"}, {"etcdCertFile": ""}):
        with pytest.raises(CniError) as exc:
            parse_conf({**CONF, **bad}, {})
        assert exc.value.code == INVALID_CONFIG, bad
