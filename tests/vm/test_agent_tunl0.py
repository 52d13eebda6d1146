"""The agent's tunl0: ensured with the node's IPAM tunnel address and MTU = underlay MTU - 20, repaired when someone
changes it, created when the kernel did not make one (all through the agent's own code)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from agent.calc.routes import IpipDevice
from datastore import model as m
from datastore.etcd import EtcdClient
from datastore.store import Store
from ipam.allocator import Ipam
from ipam.pools import add_pool
from testbed.netns import NetnsBed, NodeNs
from tests.vm.agent_steps import program_routes, snapshot, tunl0

pytestmark = pytest.mark.needs_ipip

FB_SYSCTL = "/proc/sys/net/core/fb_tunnels_only_for_init_net"


def ipip_node(etcd: EtcdClient, bed: NetnsBed, underlay_mtu: int) -> tuple[NodeNs, str]:
    """One node on an IPIP pool, its record in etcd and its tunnel address from IPAM."""
    add_pool(Store(etcd), m.IPPool("10.244.0.0/16", encapsulation="ipip"))
    ul = bed.underlay(mtu=underlay_mtu)
    node = bed.node("n1", ul, 11, mtu=underlay_mtu)
    Store(etcd).put(m.Node("n1", node.ip))
    return node, Ipam(etcd).ensure_tunnel_address("n1", "ipip")


def test_tunl0_gets_the_ipam_tunnel_address_and_mtu_and_is_repaired(etcd: EtcdClient, netns_bed: NetnsBed) -> None:
    node, tunnel_ip = ipip_node(etcd, netns_bed, underlay_mtu=9000)
    before = tunl0(node)  # the kernel's own fallback device, made when the namespace was
    assert before["addrs"] == [] and "UP" not in before["flags"]  # type: ignore[operator]

    snap = snapshot(etcd)
    assert snap.nodes["n1"].tunnel_address == tunnel_ip
    plan = program_routes(snap, node, [])
    assert plan.ipip == IpipDevice(local_ip=node.address, address=tunnel_ip)
    link = tunl0(node)
    assert link["ifindex"] == before["ifindex"]  # adopted, not replaced
    assert link["mtu"] == 9000 - 20
    assert "UP" in link["flags"]  # type: ignore[operator]
    assert link["addrs"] == [f"{tunnel_ip}/32"]

    # Someone takes it down, shrinks the MTU and swaps its address: the next pass puts everything back.
    node.ns.ip("link", "set", "tunl0", "down", "mtu", "1300")
    node.ns.ip("addr", "flush", "dev", "tunl0")
    node.ns.ip("addr", "add", "10.244.255.254/32", "dev", "tunl0")
    assert tunl0(node)["mtu"] == 1300
    program_routes(snapshot(etcd), node, [])
    link = tunl0(node)
    assert link["mtu"] == 9000 - 20
    assert "UP" in link["flags"]  # type: ignore[operator]
    assert link["addrs"] == [f"{tunnel_ip}/32"]


@pytest.fixture
def no_fallback_tunnels() -> Iterator[None]:
    """New namespaces without the kernel's tunl0 (net.core.fb_tunnels_only_for_init_net=2), as on hosts that set it.
    A machine-wide sysctl: only ever changed inside the VM tier's guest."""
    if os.environ.get("PODNET_VM_GUEST") != "1":
        pytest.skip("changes a machine-wide sysctl: runs only inside the VM tier's guest")
    with open(FB_SYSCTL) as f:
        old = f.read().strip()
    with open(FB_SYSCTL, "w") as f:
        f.write("2")
    try:
        yield
    finally:
        with open(FB_SYSCTL, "w") as f:
            f.write(old)


def test_tunl0_is_created_when_the_kernel_made_none(
    no_fallback_tunnels: None, etcd: EtcdClient, netns_bed: NetnsBed
) -> None:
    node, tunnel_ip = ipip_node(etcd, netns_bed, underlay_mtu=1500)
    assert node.ns.ip("link", "show", "tunl0", check=False) == ""
    program_routes(snapshot(etcd), node, [])
    link = tunl0(node)
    assert link["linkinfo"]["info_kind"] == "ipip"  # type: ignore[index]
    assert link["mtu"] == 1500 - 20
    assert link["addrs"] == [f"{tunnel_ip}/32"]
