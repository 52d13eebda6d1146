import pytest

from datastore import keys as k

EXAMPLES = [
    (k.ClusterConfigKey(), "/podnet/v1/config/cluster"),
    (k.BGPPeerKey("rr-bird"), "/podnet/v1/config/bgppeers/rr-bird"),
    (k.PoolKey("10.244.0.0/16"), "/podnet/v1/ipam/pools/10.244.0.0-16"),
    (k.BlockKey("10.244.1.0/26"), "/podnet/v1/ipam/blocks/10.244.1.0-26"),
    (k.AffinityKey("node-1", "10.244.1.0/26"), "/podnet/v1/ipam/affinity/node-1/10.244.1.0-26"),
    (k.HandleKey("k8s-pod-network.abc123"), "/podnet/v1/ipam/handles/k8s-pod-network.abc123"),
    (k.NodeKey("node-1"), "/podnet/v1/nodes/node-1"),
    (k.PodKey("nsa", "web-0"), "/podnet/v1/pods/nsa/web-0"),
    (k.NamespaceKey("nsa"), "/podnet/v1/namespaces/nsa"),
    (k.PolicyKey("nsa", "npa"), "/podnet/v1/policies/nsa/npa"),
    (k.EndpointKey("node-1", "nsa", "web-0", "eth0"), "/podnet/v1/endpoints/node-1/nsa/web-0/eth0"),
    (k.RouteKey("node-1", "10.244.2.0/26"), "/podnet/v1/routes/node-1/10.244.2.0-26"),
    (k.BGPPeerStatusKey("node-1", "192.168.77.12"), "/podnet/v1/bgp/node-1/peers/192.168.77.12"),
    (k.AgentStatusKey("node-1"), "/podnet/v1/agents/node-1"),
    (k.PoolKey("fd00:10::/64"), "/podnet/v1/ipam/pools/fd00:10::-64"),
]


@pytest.mark.parametrize(("key", "path"), EXAMPLES, ids=[p for _, p in EXAMPLES])
def test_round_trip(key: k.Key, path: str) -> None:
    assert key.path == path
    assert k.parse_key(path) == key


def test_every_key_kind_is_covered() -> None:
    kinds = {type(key) for key, _ in EXAMPLES}
    assert kinds == set(k.Key.__subclasses__())


@pytest.mark.parametrize(
    "path",
    [
        "/other/v1/nodes/a",
        "/podnet/v1/nodes",
        "/podnet/v1/nodes/a/b",
        "/podnet/v1/ipam/blocks/10.244.1.0/26",
        "/podnet/v1/ipam/blocks/10.244.1.1-26",  # host bits set
        "/podnet/v1/ipam/blocks/10.244.1.0-33",
        "/podnet/v1/bgp/n1/peers/not-an-ip",
        "/podnet/v1/pods/ns/",
        "/podnet/v1/pods/ns/.hidden",
        "/podnet/v1/unknown/x",
    ],
)
def test_rejects_keys_outside_the_layout(path: str) -> None:
    with pytest.raises(k.InvalidKey):
        k.parse_key(path)


def test_rejects_bad_segments_when_building() -> None:
    with pytest.raises(k.InvalidKey):
        _ = k.NodeKey("a/b").path
    with pytest.raises(k.InvalidKey):
        _ = k.BlockKey("10.244.1.5/26").path


def test_prefixes_do_not_match_longer_names() -> None:
    assert k.affinity_prefix("n1") == "/podnet/v1/ipam/affinity/n1/"
    assert not k.AffinityKey("n10", "10.0.0.0/26").path.startswith(k.affinity_prefix("n1"))
    assert k.EndpointKey("n1", "a", "b", "eth0").path.startswith(k.endpoints_prefix("n1"))
    assert k.RouteKey("n1", "10.0.0.0/26").path.startswith(k.routes_prefix("n1"))
    assert k.BGPPeerStatusKey("n1", "10.0.0.1").path.startswith(k.bgp_status_prefix("n1"))
