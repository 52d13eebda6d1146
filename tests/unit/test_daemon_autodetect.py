"""Node IP autodetection, the pure part: each method on synthetic interface lists, what it says about its choice,
and the error when nothing fits."""

from __future__ import annotations

import ipaddress

import pytest

from daemon.autodetect import Address, AutodetectError, parse_method, select

# A busy node, in the order the reader gives (interface index): everything first-found must pass over, then the
# underlay links.
NODE = [
    Address.of("lo", "127.0.0.1/8"),
    Address.of("docker0", "172.17.0.1/16"),
    Address.of("cali0123456789a", "10.244.1.7/32"),
    Address.of("vxlan.podnet", "10.244.1.0/32"),
    Address.of("tunl0", "10.244.1.1/32"),
    Address.of("veth12ab", "10.88.0.1/16"),
    Address.of("kube-ipvs0", "10.96.0.1/32"),
    Address.of("cni0", "10.22.0.1/24"),
    Address.of("eth0", "169.254.3.3/16"),  # link-local: not the node's address
    Address.of("eth0", "192.168.77.10/24"),
    Address.of("eth0", "192.168.77.99/24"),  # a secondary on the same link
    Address.of("eth1", "198.51.100.10/24"),
    Address.of("ens5", "10.1.2.3/16"),
]


def pick(method: str, addresses: list[Address] = NODE, source: str | None = None) -> tuple[str, str]:
    found = select(parse_method(method), addresses, ipaddress.IPv4Address(source) if source else None)
    return found.interface, str(found.address)


def test_first_found_passes_over_loopback_runtimes_tunnels_and_podnets_own_devices() -> None:
    found = select(parse_method("first-found"), NODE)
    assert (found.interface, str(found.address), found.ip) == ("eth0", "192.168.77.10/24", "192.168.77.10")
    text = found.explain()
    assert text.startswith("node IP 192.168.77.10/24 on eth0 (first-found: the first global address")
    for seen in ("docker0 172.17.0.1/16 skipped (docker*)", "vxlan.podnet 10.244.1.0/32 skipped (vxlan*)",
                 "kube-ipvs0 10.96.0.1/32 skipped (kube-ipvs*)", "cni0 10.22.0.1/24 skipped (cni*)",
                 "lo 127.0.0.1/8 skipped (lo)", "eth0 169.254.3.3/16 not a global address"):  # fmt: skip
        assert seen in text


def test_first_found_keeps_the_given_order_and_skips_down_interfaces() -> None:
    links = [Address.of("eth1", "198.51.100.10/24", up=False), Address.of("eth0", "192.168.77.10/24")]
    assert pick("first-found", links) == ("eth0", "192.168.77.10/24")
    assert pick("first-found", list(reversed(links))) == ("eth0", "192.168.77.10/24")
    links[0] = Address.of("eth1", "198.51.100.10/24")
    assert pick("first-found", links) == ("eth1", "198.51.100.10/24")


def test_first_found_with_nothing_usable_says_what_it_saw() -> None:
    with pytest.raises(AutodetectError) as exc:
        select(parse_method("first-found"), NODE[:8])
    assert str(exc.value).startswith("first-found: no usable IPv4 address (lo 127.0.0.1/8 skipped (lo); ")
    with pytest.raises(AutodetectError, match=r"first-found: no usable IPv4 address \(the node has no global IPv4"):
        select(parse_method("first-found"), [])


def test_interface_regex_matches_whole_names_in_order() -> None:
    assert pick("interface=eth1") == ("eth1", "198.51.100.10/24")
    assert pick("interface=ens.*,eth1") == ("eth1", "198.51.100.10/24")  # first interface matching any of them
    assert pick("interface=ens.*") == ("ens5", "10.1.2.3/16")
    assert pick("interface=eth.*") == ("eth0", "192.168.77.10/24")  # link-local passed over
    # Anchored: "eth" is not a prefix match (Calico's would take eth0), "12ab" does not find veth12ab.
    with pytest.raises(AutodetectError, match=r"interface=eth: no usable IPv4 address \(.*eth0 .* does not match eth"):
        pick("interface=eth")
    # Named explicitly, an interface first-found would skip is taken.
    assert pick("interface=docker0") == ("docker0", "172.17.0.1/16")


def test_skip_interface_adds_to_the_default_skips() -> None:
    assert pick("skip-interface=eth0") == ("eth1", "198.51.100.10/24")
    assert pick("skip-interface=eth0,eth1") == ("ens5", "10.1.2.3/16")
    assert pick("skip-interface=eth.*") == ("ens5", "10.1.2.3/16")
    with pytest.raises(AutodetectError, match=r"eth1 198\.51\.100\.10/24 skipped \(eth\.\*\)"):
        pick("skip-interface=eth.*,ens5")


def test_cidr_takes_the_first_address_inside_and_never_a_podnet_device() -> None:
    assert pick("cidr=198.51.100.0/24") == ("eth1", "198.51.100.10/24")
    assert pick("cidr=10.0.0.0/8") == ("ens5", "10.1.2.3/16")  # not vxlan.podnet's 10.244.1.0 nor docker's
    assert pick("cidr=10.1.0.0/16,192.168.77.0/24") == ("eth0", "192.168.77.10/24")  # interface order
    with pytest.raises(AutodetectError, match=r"cidr=203\.0\.113\.0/24: no usable .*ens5 10\.1\.2\.3/16 not in 203"):
        pick("cidr=203.0.113.0/24")


def test_can_reach_takes_the_kernels_source_and_checks_it() -> None:
    found = select(parse_method("can-reach=198.51.100.1"), NODE, ipaddress.IPv4Address("198.51.100.10"))
    assert (found.interface, str(found.address)) == ("eth1", "198.51.100.10/24")
    assert "can-reach=198.51.100.1: the source address of the route to 198.51.100.1" in found.explain()
    assert pick("can-reach=8.8.8.8", source="192.168.77.99") == ("eth0", "192.168.77.99/24")
    with pytest.raises(AutodetectError, match=r"10\.244\.1\.0 is on vxlan\.podnet, which is skipped \(vxlan\*\)"):
        pick("can-reach=10.244.2.5", source="10.244.1.0")
    with pytest.raises(AutodetectError, match=r"203\.0\.113\.1 is not an address of any interface of this node"):
        pick("can-reach=8.8.8.8", source="203.0.113.1")
    with pytest.raises(ValueError, match="source address is required"):
        pick("can-reach=8.8.8.8")


def test_an_explicit_address_must_be_the_nodes() -> None:
    assert pick("198.51.100.10") == ("eth1", "198.51.100.10/24")  # the prefix is the interface's
    assert pick("198.51.100.10/24") == ("eth1", "198.51.100.10/24")
    assert "(198.51.100.10: set explicitly)" in select(parse_method("198.51.100.10"), NODE).explain()
    with pytest.raises(AutodetectError, match=r"198\.51\.100\.10/16: the address is 198\.51\.100\.10/24 on eth1"):
        pick("198.51.100.10/16")
    with pytest.raises(AutodetectError, match=r"192\.0\.2\.1: 192\.0\.2\.1 is not an address of any interface"):
        pick("192.0.2.1")
    with pytest.raises(AutodetectError, match="is on eth9, which is down"):
        pick("192.0.2.1", [Address.of("eth9", "192.0.2.1/24", up=False)])


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("first-found", "first-found"),
        (" First-Found ", "first-found"),
        ("interface = eth0 , ens.* ", "interface=eth0,ens.*"),
        ("skip-interface=eth0", "skip-interface=eth0"),
        ("can-reach=192.0.2.1", "can-reach=192.0.2.1"),
        ("cidr=10.0.0.0/8, 192.168.0.0/16", "cidr=10.0.0.0/8,192.168.0.0/16"),
        ("192.0.2.7", "192.0.2.7"),
    ],
)
def test_methods_parse_to_one_spelling(text: str, canonical: str) -> None:
    assert parse_method(text).text == canonical


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("first_found", "'first_found' is not an autodetection method: expected first-found, interface=REGEX"),
        ("interface=", "'interface=': expected regular expressions after '='"),
        ("interface=eth0,", "'interface=eth0,': expected regular expressions after '='"),
        ("interface=eth(", "'interface=eth(': 'eth(' is not a regular expression (missing ), unterminated"),
        ("can-reach=example.com", "'can-reach=example.com': can-reach needs an IPv4 address, not 'example.com'"),
        ("can-reach=0.0.0.0", "'can-reach=0.0.0.0': 0.0.0.0 is not a unicast address"),
        ("cidr=10.0.0.1/8", "'cidr=10.0.0.1/8': '10.0.0.1/8' is not an IPv4 CIDR (10.0.0.1/8 has host bits set)"),
        ("cidr=fd00::/8", "'cidr=fd00::/8': 'fd00::/8' is not an IPv4 CIDR"),
        ("127.0.0.1", "'127.0.0.1': 127.0.0.1 is not a unicast address"),
        ("reach=1.2.3.4", "'reach=1.2.3.4': unknown autodetection method 'reach' (expected one of first-found, "),
    ],
)
def test_bad_methods_are_refused_with_the_text_quoted(text: str, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse_method(text)
    assert str(exc.value).startswith(message)
