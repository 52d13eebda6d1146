"""Node bootstrap, the pure parts: which fields of the node record the agent sets and which it keeps, which tunnel
devices the pools need, and which sysctls (named as sysctl(8) names them) each encapsulation asks for."""

from __future__ import annotations

from agent.calc.routes import vtep_mac
from daemon.bootstrap import SysctlResult, _proc_path, merge, record_drift, tunnel_kinds, wanted_sysctls
from datastore import model as m

OPERATOR = m.Node(
    name="n1",
    ip="192.168.77.9/24",
    as_number=64600,
    rr_cluster_id="1.0.0.1",
    vxlan_address="10.244.1.0",
    vxlan_mac="02:00:00:00:00:01",
    labels={"rack": "a"},
)


def test_a_new_record_has_the_address_and_the_option_as() -> None:
    node, written, kept = merge(None, "n1", "192.168.77.10/24", 64512, vxlan=False)
    assert node == m.Node("n1", "192.168.77.10/24", as_number=64512)
    assert written == ["ip 192.168.77.10/24", "asNumber 64512"]
    assert kept == []


def test_operator_fields_are_kept_and_the_address_follows_the_node() -> None:
    node, written, kept = merge(OPERATOR, "n1", "192.168.77.10/24", None, vxlan=True)
    assert node == m.Node(
        name="n1",
        ip="192.168.77.10/24",
        as_number=64600,
        rr_cluster_id="1.0.0.1",
        vxlan_address="10.244.1.0",
        vxlan_mac="02:00:00:00:00:01",
        labels={"rack": "a"},
    )
    assert written == ["ip 192.168.77.10/24 (was 192.168.77.9/24)"]
    assert kept == [
        "asNumber 64600",
        "vxlanMAC 02:00:00:00:00:01",
        "routeReflectorClusterID 1.0.0.1",
        "labels rack=a",
        "vxlanAddress 10.244.1.0",
    ]


def test_the_as_option_overrides_the_record() -> None:
    node, written, _ = merge(OPERATOR, "n1", OPERATOR.ip, 64700, vxlan=False)
    assert node.as_number == 64700
    assert written == ["asNumber 64700 (was 64600)"]


def test_nothing_to_write_when_the_record_already_agrees() -> None:
    _, written, _ = merge(OPERATOR, "n1", OPERATOR.ip, 64600, vxlan=True)
    assert written == []


def test_vxlan_needs_a_vtep_mac_the_route_calculation_agrees_with() -> None:
    bare = m.Node("n2", "192.168.77.12/24")
    node, written, _ = merge(bare, "n2", bare.ip, None, vxlan=True)
    assert node.vxlan_mac == vtep_mac(bare)  # what every peer computes for a record without one
    assert int(node.vxlan_mac.split(":")[0], 16) & 0x03 == 0x02  # locally administered, unicast
    assert written == [f"vxlanMAC {node.vxlan_mac}"]
    assert merge(bare, "n2", bare.ip, None, vxlan=False)[0].vxlan_mac is None


def test_tunnel_kinds_from_pools() -> None:
    assert tunnel_kinds([]) == ()
    assert tunnel_kinds([m.IPPool("10.1.0.0/16", encapsulation="none")]) == ()
    pools = [
        m.IPPool("10.1.0.0/16", encapsulation="vxlan"),
        m.IPPool("10.2.0.0/16", encapsulation="ipip", disabled=True),  # its blocks still route
        m.IPPool("10.3.0.0/16", encapsulation="vxlan"),
    ]
    assert tunnel_kinds(pools) == ("ipip", "vxlan")


def test_sysctls_by_encapsulation() -> None:
    assert wanted_sysctls("none") == [("net.ipv4.ip_forward", "1", None)]
    assert wanted_sysctls("vxlan") == [
        ("net.ipv4.ip_forward", "1", None),
        ("net.ipv4.conf.vxlan/podnet.rp_filter", "2", "vxlan.podnet"),
    ]
    assert [name for name, _, _ in wanted_sysctls(("vxlan", "ipip"))] == [
        "net.ipv4.ip_forward",
        "net.ipv4.conf.tunl0.rp_filter",
        "net.ipv4.conf.vxlan/podnet.rp_filter",
    ]


def test_sysctl_names_map_to_proc_paths() -> None:
    assert _proc_path("net.ipv4.ip_forward") == "/proc/sys/net/ipv4/ip_forward"
    assert _proc_path("net.ipv4.conf.vxlan/podnet.rp_filter") == "/proc/sys/net/ipv4/conf/vxlan.podnet/rp_filter"


def test_sysctl_results_say_what_happened() -> None:
    assert SysctlResult("net.ipv4.ip_forward", "0", "1").describe() == "sysctl net.ipv4.ip_forward: 0 → 1"
    assert SysctlResult("net.ipv4.ip_forward", "1", "1").describe() == "sysctl net.ipv4.ip_forward = 1 (already)"
    absent = SysctlResult("net.ipv4.conf.tunl0.rp_filter", absent=True)
    assert not absent.changed and "not there yet" in absent.describe()
    failed = SysctlResult("net.ipv4.ip_forward", "0", error="writing 1: Permission denied")
    assert not failed.changed and failed.describe() == "sysctl net.ipv4.ip_forward: writing 1: Permission denied"


def test_record_drift_says_what_registration_would_repair() -> None:
    ip = "192.168.77.10/24"
    assert record_drift(None, ip, (), None) == "is missing"
    assert record_drift(m.Node("n1", ip, as_number=64600, labels={"a": "b"}), ip, (), None) == ""
    assert record_drift(m.Node("n1", "192.168.77.9/24"), ip, (), 64512) == (
        "says ip 192.168.77.9/24, not 192.168.77.10/24, says asNumber None, not 64512"
    )
    assert record_drift(m.Node("n1", ip), ip, ("ipip", "vxlan"), None) == (
        "has no vxlan tunnel address, has no VTEP MAC, has no ipip tunnel address"
    )
    done = m.Node("n1", ip, tunnel_address="10.244.0.1", vxlan_address="10.244.0.2", vxlan_mac="02:00:00:00:00:01")
    assert record_drift(done, ip, ("ipip", "vxlan"), None) == ""
