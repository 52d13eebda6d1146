"""ExaBGP API text: commands podnet builds, the bridge's validator, JSON event decoding, configuration text."""

from __future__ import annotations

import pytest

from bgp import commands, events, exabgp_conf
from bgp.commands import CommandError, OutRoute
from bgp.plan import PeerSpec, SpeakerIdentity


def test_command_builders() -> None:
    route = OutRoute("10.244.1.0/26", "10.0.0.11", 100, (65001,), "10.0.0.11", ("1.0.0.1", "1.0.0.2"))
    assert commands.announce(["10.0.0.2", "10.0.0.3"], route) == (
        "neighbor 10.0.0.2 , neighbor 10.0.0.3 announce route 10.244.1.0/26 next-hop 10.0.0.11 "
        "local-preference 100 as-path [ 65001 ] originator-id 10.0.0.11 cluster-list [ 1.0.0.1 1.0.0.2 ]"
    )
    assert commands.withdraw(["10.0.0.2"], "10.244.1.0/26") == "neighbor 10.0.0.2 withdraw route 10.244.1.0/26"
    assert commands.eor("10.0.0.2") == "neighbor 10.0.0.2 announce eor ipv4 unicast"
    for line in (commands.eor("10.0.0.2"), commands.route_refresh("10.0.0.2"), "reload", "show neighbor json"):
        commands.validate(line)


@pytest.mark.parametrize(
    "line",
    [
        "shutdown",
        "neighbor 10.0.0.2 announce route 10.244.1.0/26 next-hop self",
        "neighbor 10.0.0.2 announce route 10.244.1.5/26 next-hop 10.0.0.1",  # host bits set
        "neighbor 10.0.0.300 withdraw route 10.244.1.0/26",
        "neighbor 10.0.0.2 withdraw route 10.244.1.0/26\nshutdown",
        "neighbor 10.0.0.2 announce route 10.244.1.0/26 next-hop 10.0.0.1 community [ 1:1 ]",
        "",
    ],
)
def test_validator_refuses_anything_else(line: str) -> None:
    with pytest.raises(CommandError):
        commands.validate(line)


def test_builder_refuses_bad_input() -> None:
    with pytest.raises(ValueError):
        commands.withdraw([], "10.244.1.0/26")
    with pytest.raises(ValueError):
        commands.withdraw(["not-an-ip"], "10.244.1.0/26")


HEAD = '{ "exabgp": "5.0.0", "time": 1.0, "host" : "vm", "pid" : 1, "ppid" : 1, "counter": 1, '
NEIGHBOR = (
    '"neighbor": { "address": { "local": "10.0.0.12", "peer": "10.0.0.11" }, "asn": { "local": 64512, "peer": 64512 }, '
)


def test_events_hand_written() -> None:
    """Hand-written events; the AS_PATH here is in ExaBGP 4's list form, still accepted. What ExaBGP 5.0.15 really
    writes is recorded in tests/unit/fixtures/exabgp_events.jsonl (tests/unit/test_bgp_events.py)."""
    assert events.parse(
        HEAD + '"type": "state", ' + NEIGHBOR + '"state": "down", "reason": "closing connection" } }'
    ) == (events.StateEvent("10.0.0.11", "down", "closing connection"))
    update = events.parse(
        HEAD + '"type": "update", ' + NEIGHBOR + '"direction": "receive", "message": { "update": { "attribute": '
        '{ "origin": "igp", "as-path": [ 65001, [ 65002, 65003 ] ], "local-preference": 100, "originator-id": '
        '"10.0.0.13", "cluster-list": [ "1.0.0.1" ] }, "announce": { "ipv4 unicast": { "10.0.0.13": [ { "nlri": '
        '"10.244.3.0/26" } ] } }, "withdraw": { "ipv4 unicast": [ { "nlri": "10.244.4.0/26" } ] } } } } }'
    )
    assert isinstance(update, events.UpdateEvent)
    [route] = update.announced
    assert (route.prefix, route.next_hop, route.peer, route.as_path) == (
        "10.244.3.0/26",
        "10.0.0.13",
        "10.0.0.11",
        (65001, (65002, 65003)),  # a nested list is an AS_SET
    )
    assert (route.local_pref, route.originator_id, route.cluster_list) == (100, "10.0.0.13", ("1.0.0.1",))
    assert update.withdrawn == ("10.244.4.0/26",)
    eor = events.parse(
        HEAD
        + '"type": "update", '
        + NEIGHBOR
        + '"direction": "receive", "message": { "eor": { "afi" : "ipv4", "safi" : "unicast" } } } }'
    )
    assert eor == events.UpdateEvent("10.0.0.11", eor=True)
    opened = events.parse(
        HEAD + '"type": "open", ' + NEIGHBOR + '"direction": "receive", "open": { "version": 4, "asn": 64512, '
        '"hold_time": 3, "router_id": "10.0.0.11", "capabilities": { "64": { "name": "graceful restart", '
        '"time": 4 } } } } }'
    )
    assert opened == events.OpenEvent("10.0.0.11", "10.0.0.11", 4)


@pytest.mark.parametrize("line", ["", "not json", "[1]", '{"type": "state"}', '{"type": "update", "neighbor": 3}'])
def test_malformed_events_are_ignored(line: str) -> None:
    assert events.parse(line) is None


def test_configuration_text() -> None:
    ident = SpeakerIdentity("a", "10.0.0.11", 64512, "10.0.0.11")
    peers = [
        PeerSpec("10.0.0.12", 64512, "node-to-node mesh", passive=True, hold_time=3, graceful_restart_time=0),
        PeerSpec("10.0.0.1", 65000, "global", password='p"w;}', in_cluster=False),
        PeerSpec("10.0.0.11", 65000, "global", error="own address"),
    ]
    text = exabgp_conf.render(ident, peers, "/venv/bin/python -m bgp.bridge /run/b.sock")
    assert "neighbor 10.0.0.11 " not in text  # the invalid peer has no session
    assert text.count("neighbor ") == 2
    assert 'md5-password "cCJ3O30=";' in text and "md5-base64 true;" in text  # base64: quotes cannot escape
    assert "passive true;" in text and "hold-time 3;" in text and "manual-eor true;" in text
    assert "graceful-restart" not in text.split("neighbor 10.0.0.1 ")[0].split("neighbor 10.0.0.12 ")[1]
    with pytest.raises(ValueError):
        exabgp_conf.render(ident, peers, "python -m bgp.bridge /x; rm -rf /")
