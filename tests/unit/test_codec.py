import json
import typing

import pytest

from datastore import codec
from datastore import keys as k
from datastore import model as m
from datastore.fields import ModelError

SAMPLES: list[codec.Model] = [
    m.ClusterConfig(as_number=64513, node_mesh=False, encapsulation="ipip", strict_affinity=True),
    m.BGPPeer(name="bird", peer_ip="192.168.77.2", as_number=64600, password="s3cret", hold_time=9),
    m.BGPPeer(name="tor-n1", peer_ip="192.168.77.3", as_number=64601, node="n1"),
    m.IPPool(cidr="10.244.0.0/16", block_size=26, encapsulation="none", cross_subnet=True, node_selector={"a": "b"}),
    m.Block(
        cidr="10.244.1.0/26",
        affinity="node:n1",
        allocations={0: m.Allocation("tunnel-n1", kind="tunnel"), 5: m.Allocation("k8s-pod-network.c1", "nsa/p")},
    ),
    m.Affinity(node="n1", cidr="10.244.1.0/26", state="pending"),
    m.Handle(handle="k8s-pod-network.c1", ips=("10.244.1.5",), pod="nsa/p", node="n1"),
    m.Node(name="n1", ip="192.168.77.11/24", as_number=64512, rr_cluster_id="1.0.0.1", vxlan_mac="0a:58:0a:f4:01:01"),
    m.Pod(
        namespace="nsa",
        name="p",
        labels={"app": "web"},
        ips=("10.244.1.5",),
        node="n1",
        named_ports=(m.NamedPort("http", 8080), m.NamedPort("dns", 53, "UDP")),
    ),
    m.Namespace(name="nsa", labels={"team": "a"}),
    m.Policy(namespace="nsa", name="npa", spec={"podSelector": {}, "policyTypes": ["Ingress"]}),
    m.Endpoint(
        node="n1",
        namespace="nsa",
        pod="p",
        iface="eth0",
        host_iface="cali0123456789a",
        ips=("10.244.1.5/32",),
        container_id="c1",
    ),
    m.RouteStatus(node="n1", cidr="10.244.2.0/26", type="remote-block", via="192.168.77.12", dev="eth0"),
    m.BGPPeerStatus(node="n1", peer_ip="192.168.77.12", peer_type="node-to-node mesh", state="Established"),
    m.AgentStatus(node="n1", in_sync=True, revision=7, router_id="192.168.77.11", as_number=64512, problems=("x",)),
]


@pytest.mark.parametrize("value", SAMPLES, ids=lambda v: type(v).__name__)
def test_encode_decode_round_trip(value: codec.Model) -> None:
    key = codec.key_of(value)
    parsed_key, decoded = codec.decode(key.path, codec.encode(value))
    assert parsed_key == key
    assert decoded == value


def test_every_model_has_a_sample() -> None:
    assert {type(v) for v in SAMPLES} == set(typing.get_args(codec.Model))


BAD = [
    ("/podnet/v1/nodes/n1", b"{not json", "not valid JSON"),
    ("/podnet/v1/nodes/n1", b"[1,2]", "expected a JSON object"),
    ("/podnet/v1/nodes/n1", b'{"name":"n1"}', "ip: required"),
    ("/podnet/v1/nodes/n1", b'{"name":"n1","ip":"300.1.1.1/24"}', "not an address/prefix"),
    ("/podnet/v1/nodes/n1", b'{"name":"n2","ip":"192.168.77.1/24"}', "stored at"),
    ("/podnet/v1/nodes/n1", b'{"name":"n1","ip":"192.168.77.1/24","asNumber":0}', "asNumber: 0 is below 1"),
    ("/podnet/v1/nodes/n1", b'{"name":"n1","ip":"192.168.77.1/24","vxlanMAC":"zz"}', "vxlanMAC"),
    ("/podnet/v1/ipam/pools/10.244.0.0-16", b'{"cidr":"10.244.0.0/16","blockSize":12}', "blockSize"),
    ("/podnet/v1/ipam/pools/10.244.0.0-16", b'{"cidr":"10.244.0.0/16","encapsulation":"gre"}', "encapsulation"),
    ("/podnet/v1/ipam/pools/10.244.0.0-16", b'{"cidr":"10.244.0.1/16"}', "not a CIDR"),
    ("/podnet/v1/ipam/blocks/10.244.1.0-30", b'{"cidr":"10.244.1.0/30","allocations":{"4":{"handle":"h"}}}', "outside"),
    ("/podnet/v1/ipam/blocks/10.244.1.0-30", b'{"cidr":"10.244.1.0/30","affinity":"host:x"}', "affinity"),
    ("/podnet/v1/config/bgppeers/p", b'{"name":"p","peerIP":"1.2.3.4","asNumber":4294967296}', "above"),
    ("/podnet/v1/config/bgppeers/p", b'{"name":"p","peerIP":"x","asNumber":1}', "peerIP"),
    (
        "/podnet/v1/config/bgppeers/p",
        b'{"name":"p","peerIP":"1.2.3.4","asNumber":1,"password":"' + b"x" * 81 + b'"}',
        "password",
    ),
    ("/podnet/v1/config/bgppeers/p", b'{"name":"p","peerIP":"1.2.3.4","asNumber":1,"holdTime":2}', "holdTime"),
    ("/podnet/v1/pods/nsa/p", b'{"namespace":"nsa","name":"p","namedPorts":[{"name":"x","port":70000}]}', "port"),
    ("/podnet/v1/pods/nsa/p", b'{"namespace":"nsa","name":"p","labels":{"a":1}}', "labels"),
    ("/podnet/v1/policies/nsa/npa", b'{"metadata":{"namespace":"nsa","name":"npa"},"spec":[]}', "spec"),
    ("/podnet/v1/config/cluster", b'{"nodeToNodeMesh":"yes"}', "nodeToNodeMesh"),
    ("/podnet/v1/config/cluster", b"\xff\xfe", "not valid JSON"),
]


@pytest.mark.parametrize(("path", "raw", "reason"), BAD, ids=[r for _, _, r in BAD])
def test_bad_values_raise_model_error_naming_the_problem(path: str, raw: bytes, reason: str) -> None:
    with pytest.raises(ModelError, match=reason):
        codec.decode(path, raw)


def test_defaults_fill_optional_fields() -> None:
    _, pool = codec.decode("/podnet/v1/ipam/pools/10.244.0.0-16", json.dumps({"cidr": "10.244.0.0/16"}).encode())
    assert pool == m.IPPool(cidr="10.244.0.0/16", block_size=26, encapsulation="vxlan")
    _, cfg = codec.decode("/podnet/v1/config/cluster", b"{}")
    assert cfg == m.ClusterConfig()
    assert cfg.as_number == 64512 and cfg.node_mesh


def test_decode_as_checks_type() -> None:
    raw = codec.encode(m.Namespace("nsa"))
    assert codec.decode_as("/podnet/v1/namespaces/nsa", raw, m.Namespace) == m.Namespace("nsa")
    with pytest.raises(ModelError):
        codec.decode_as("/podnet/v1/namespaces/nsa", raw, m.Pod)


def test_unknown_key_is_invalid() -> None:
    with pytest.raises(k.InvalidKey):
        codec.decode("/podnet/v1/whatever/x", b"{}")


def test_block_helpers() -> None:
    block = m.Block(cidr="10.244.1.0/26", affinity="node:n1")
    assert block.size == 64
    assert block.affine_node == "n1"
    assert block.address(5) == "10.244.1.5"
