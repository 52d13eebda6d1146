"""Node IP autodetection against a real kernel: a node namespace with two underlay links (eth0 on 192.168.77.0/24
with the default route, eth1 on 198.51.100.0/24 with a route to 203.0.113.0/24), ahead of them a docker0 bridge and
a down interface, after them podnet's vxlan.podnet; each method picks what it should, can-reach through the link
the kernel routes by."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator

import pytest

from daemon.autodetect import Address, AutodetectError, detect, parse_method, read_addresses, route_source
from testbed.netns import Netns, NetnsBed, sh

pytestmark = pytest.mark.netns


def veth(node: Netns, name: str, peer_ns: Netns, address: str, peer_address: str) -> None:
    sh("ip", "link", "add", name, "netns", node.name, "type", "veth", "peer", "name", "peer0", "netns", peer_ns.name)
    peer_ns.ip("addr", "add", peer_address, "dev", "peer0")
    peer_ns.ip("link", "set", "peer0", "up")
    node.ip("addr", "add", address, "dev", name)
    node.ip("link", "set", name, "up")


@pytest.fixture(scope="module")
def node() -> Iterator[Netns]:
    with NetnsBed() as bed:
        n1 = bed.netns("n1")
        # Created first, so they come first in index order: first-found must pass over them.
        n1.ip("link", "add", "docker0", "type", "bridge")
        n1.ip("addr", "add", "172.17.0.1/16", "dev", "docker0")
        n1.ip("link", "set", "docker0", "up")
        n1.ip("link", "add", "eth2", "type", "bridge")  # down: its address is not the node's
        n1.ip("addr", "add", "10.9.9.9/24", "dev", "eth2")
        veth(n1, "eth0", bed.netns("net1"), "192.168.77.10/24", "192.168.77.1/24")
        n1.ip("addr", "add", "192.168.77.99/24", "dev", "eth0")  # secondary
        veth(n1, "eth1", bed.netns("net2"), "198.51.100.10/24", "198.51.100.1/24")
        n1.ip("route", "add", "default", "via", "192.168.77.1")
        n1.ip("route", "add", "203.0.113.0/24", "via", "198.51.100.1")
        n1.ip("route", "add", "unreachable", "198.18.0.0/15")
        n1.ip("link", "add", "vxlan.podnet", "type", "vxlan", "id", "4096", "dstport", "4789", "dev", "eth0")
        n1.ip("addr", "add", "10.244.1.0/32", "dev", "vxlan.podnet")
        n1.ip("link", "set", "vxlan.podnet", "up")
        n1.ip("route", "add", "10.244.2.0/26", "dev", "vxlan.podnet")
        yield n1


def test_the_reader_sees_global_ipv4_addresses_in_index_order(node: Netns) -> None:
    own_ns = os.readlink("/proc/thread-self/ns/net")
    assert read_addresses(node.name) == [
        Address.of("docker0", "172.17.0.1/16"),
        Address.of("eth2", "10.9.9.9/24", up=False),
        Address.of("eth0", "192.168.77.10/24"),
        Address.of("eth0", "192.168.77.99/24"),
        Address.of("eth1", "198.51.100.10/24"),
        Address.of("vxlan.podnet", "10.244.1.0/32"),
    ]
    assert os.readlink("/proc/thread-self/ns/net") == own_ns  # the thread came back


@pytest.mark.parametrize(
    ("method", "interface", "address"),
    [
        ("first-found", "eth0", "192.168.77.10/24"),
        ("interface=eth1", "eth1", "198.51.100.10/24"),
        ("interface=eth[0-9]", "eth0", "192.168.77.10/24"),  # eth2 is first but down
        ("skip-interface=eth0", "eth1", "198.51.100.10/24"),
        ("can-reach=192.0.2.1", "eth0", "192.168.77.10/24"),  # the default route
        ("can-reach=203.0.113.5", "eth1", "198.51.100.10/24"),  # the route through eth1
        ("can-reach=198.51.100.77", "eth1", "198.51.100.10/24"),  # eth1's own subnet
        ("cidr=198.51.100.0/24", "eth1", "198.51.100.10/24"),
        ("cidr=10.0.0.0/8,192.168.0.0/16", "eth0", "192.168.77.10/24"),  # not vxlan.podnet's 10.244.1.0
        ("192.168.77.99", "eth0", "192.168.77.99/24"),
    ],
)
def test_each_method_picks_the_expected_address(node: Netns, method: str, interface: str, address: str) -> None:
    found = detect(parse_method(method), node.name)
    assert (found.interface, str(found.address)) == (interface, address), found.explain()


def test_can_reach_uses_the_kernels_route_not_a_guess(node: Netns) -> None:
    assert route_source(ipaddress.IPv4Address("203.0.113.200"), node.name) == ipaddress.IPv4Address("198.51.100.10")
    node.ip("route", "replace", "203.0.113.0/24", "via", "192.168.77.1")
    try:
        found = detect(parse_method("can-reach=203.0.113.200"), node.name)
        assert (found.interface, found.ip) == ("eth0", "192.168.77.10")
    finally:
        node.ip("route", "replace", "203.0.113.0/24", "via", "198.51.100.1")


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("can-reach=10.244.2.5", r"can-reach=10\.244\.2\.5: 10\.244\.1\.0 is on vxlan\.podnet, which is skipped"),
        ("can-reach=198.18.0.1", r"can-reach=198\.18\.0\.1: the node has no route to it \("),
        ("cidr=10.0.0.0/8", r"cidr=10\.0\.0\.0/8: no usable IPv4 address \(docker0 172\.17\.0\.1/16 skipped .*"
                            r"eth2 10\.9\.9\.9/24 down; .*vxlan\.podnet 10\.244\.1\.0/32 skipped \(vxlan\*\)\)"),
        ("192.0.2.10", r"192\.0\.2\.10: 192\.0\.2\.10 is not an address of any interface of this node"),
        ("interface=wlan0", r"interface=wlan0: no usable IPv4 address"),
    ],
)  # fmt: skip
def test_nothing_fits_says_why(node: Netns, method: str, message: str) -> None:
    with pytest.raises(AutodetectError, match=message):
        detect(parse_method(method), node.name)


def test_a_missing_namespace_is_a_clear_error() -> None:
    with pytest.raises(AutodetectError, match=r"network namespace /run/netns/pnt-no-such-ns: No such file"):
        read_addresses("pnt-no-such-ns")
