"""ExaBGP events as the pinned ExaBGP (5.0.15) really writes them, recorded from live sessions with BIRD 2 and GoBGP
(tests/unit/fixtures/record_exabgp_events.py), decoded; and the AS_PATH handling built on them: sets, loop
detection, and the text podnet sends back to ExaBGP when it reflects a route."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bgp import aspath, commands, events
from bgp.commands import CommandError, OutRoute
from bgp.outbound import AS_LOOP, AS_ZERO, POLICY, refusal
from bgp.plan import PeerSpec, SpeakerIdentity
from bgp.rib import LearnedRoute, Rib

FIXTURE = Path(__file__).parent / "fixtures" / "exabgp_events.jsonl"
A, BIRD, GOBGP = "192.168.77.11", "192.168.77.30", "192.168.77.31"
RR, C, BIRD_CLIENT = "192.168.77.20", "192.168.77.13", "192.168.77.14"


def recorded() -> list[tuple[str, str]]:
    return [(r["node"], r["line"]) for r in map(json.loads, FIXTURE.read_text().splitlines())]


def announced(node: str) -> dict[tuple[str, str], LearnedRoute]:
    """(peer, prefix) -> route, of every recorded update that ``node`` received."""
    out: dict[tuple[str, str], LearnedRoute] = {}
    for who, line in recorded():
        event = events.parse(line)
        if who == node and isinstance(event, events.UpdateEvent):
            out.update({(r.peer, r.prefix): r for r in event.announced})
    return out


def test_the_fixture_is_what_exabgp_5_writes() -> None:
    lines = [line for _, line in recorded()]
    assert all(json.loads(line)["exabgp"].startswith("5.") for line in lines)
    # the object form keyed by segment position, never the list form ExaBGP 4 wrote
    assert any('"as-path": {"0": {"element": "as-sequence"' in line for line in lines)
    assert any('{"element": "as-set", "value": [65021, 65022]}' in line for line in lines)


def test_every_recorded_update_decodes() -> None:
    for _, line in recorded():
        doc = json.loads(line)
        if doc["type"] in ("update", "state", "open"):
            assert events.parse(line) is not None, line


def test_multi_as_paths_from_external_peers_are_decoded_intact() -> None:
    got = announced("a")
    assert got[(BIRD, "198.51.100.0/24")].as_path == (64600, 65010, 65011)
    assert got[(BIRD, "10.244.9.0/26")].as_path == (64600, 64512)
    assert got[(GOBGP, "192.0.2.0/24")].as_path == (64700, 65030, 65031)
    # 65020 {65021,65022}: the set is one item, so the path length is 3 (RFC 4271 9.1.2.2)
    with_set = got[(GOBGP, "203.0.113.0/24")]
    assert with_set.as_path == (64700, 65020, (65021, 65022))
    assert len(with_set.as_path) == 3
    assert (with_set.next_hop, with_set.peer) == (GOBGP, GOBGP)


def test_a_reflected_route_keeps_its_path_and_reflection_attributes() -> None:
    assert announced("rr")[(BIRD_CLIENT, "198.51.100.0/24")].as_path == (64600, 65010, 65011)
    assert announced("rr")[(C, "10.244.3.0/26")].as_path == ()  # iBGP, own route: no AS_PATH attribute
    route = announced("c")[(RR, "198.51.100.0/24")]
    assert route == LearnedRoute(
        "198.51.100.0/24",
        BIRD_CLIENT,
        RR,
        as_path=(64600, 65010, 65011),
        local_pref=100,
        originator_id=BIRD_CLIENT,
        cluster_list=("1.0.0.1",),
    )


def test_no_recorded_path_decodes_to_as_0() -> None:
    for node in ("a", "rr", "c"):
        for route in announced(node).values():
            assert 0 not in aspath.asns(route.as_path)


def test_withdrawals_and_end_of_rib_are_decoded() -> None:
    kinds = [events.parse(line) for who, line in recorded() if who == "a"]
    assert events.UpdateEvent(GOBGP, withdrawn=("192.0.2.0/24",)) in kinds
    assert events.UpdateEvent(BIRD, eor=True) in kinds
    assert events.OpenEvent(BIRD, BIRD, 120) in kinds and events.OpenEvent(GOBGP, GOBGP, None) in kinds


def _with_path(path: object) -> str:
    _, line = next((w, ln) for w, ln in recorded() if w == "a" and "198.51.100.0/24" in ln)
    doc = json.loads(line)
    doc["neighbor"]["message"]["update"]["attribute"]["as-path"] = path
    doc["neighbor"]["message"]["update"]["withdraw"] = {"ipv4 unicast": [{"nlri": "192.0.2.0/24"}]}
    return json.dumps(doc)


@pytest.mark.parametrize(
    "path",
    [
        {"0": {"element": "as-confusion", "value": [1]}},
        {"0": {"element": "as-sequence", "value": ["x"]}},
        {"0": {"element": "as-sequence", "value": [2**32]}},
        {"x": {"element": "as-sequence", "value": [1]}},
        {"0": {"value": [1]}},
        "64600 65010",
    ],
)
def test_an_unreadable_path_withdraws_its_routes_and_keeps_the_rest(path: object) -> None:
    event = events.parse(_with_path(path))
    assert event == events.UpdateEvent(BIRD, (), ("192.0.2.0/24", "198.51.100.0/24"))  # treat-as-withdraw


def test_the_old_list_form_is_still_accepted() -> None:
    event = events.parse(_with_path([64600, [65021, 65022], 65010]))
    assert isinstance(event, events.UpdateEvent)
    assert event.announced[0].as_path == (64600, (65021, 65022), 65010)


def test_paths_go_back_to_exabgp_as_sequences_and_sets() -> None:
    assert aspath.to_command((64600, 65010, 65011)) == "[ 64600 65010 65011 ]"
    assert aspath.to_command((64700, 65020, (65021, 65022), 65030)) == "[ 64700 65020 ] ( 65021 65022 ) [ 65030 ]"
    assert aspath.render((64700, 65020, (65021, 65022))) == "64700 65020 {65021,65022}"
    route = OutRoute("198.51.100.0/24", BIRD_CLIENT, 100, (64700, (65021, 65022)), BIRD_CLIENT, ("1.0.0.1",))
    line = commands.announce([A], route)
    assert "as-path [ 64700 ] ( 65021 65022 ) originator-id" in line
    commands.validate(line)
    for bad in ((0,), (64600, 0), (64600, ()), (2**32,)):
        with pytest.raises(CommandError):
            commands.announce([A], OutRoute("198.51.100.0/24", BIRD_CLIENT, as_path=bad))
    with pytest.raises(CommandError):  # AS 0 never reaches ExaBGP (RFC 7607), even in a hand-made line
        commands.validate(f"neighbor {A} announce route 198.51.100.0/24 next-hop {BIRD} as-path [ 0 ]")


ME = SpeakerIdentity("a", A, 64512, A)
EXTERNAL = PeerSpec(BIRD, 64600, "global", in_cluster=False, accept_routes=True)


def test_a_path_with_our_own_as_is_refused_as_a_loop() -> None:
    route = announced("a")[(BIRD, "10.244.9.0/26")]
    assert refusal(ME, EXTERNAL, route) == AS_LOOP
    assert refusal(ME, EXTERNAL, announced("a")[(BIRD, "198.51.100.0/24")]) is None
    in_a_set = LearnedRoute("10.244.9.0/26", BIRD, BIRD, as_path=(64600, (65000, 64512)))
    assert refusal(ME, EXTERNAL, in_a_set) == AS_LOOP
    assert refusal(ME, EXTERNAL, LearnedRoute("10.244.9.0/26", BIRD, BIRD, as_path=(64600, 0))) == AS_ZERO
    # without acceptRoutes nothing is accepted, and it is the policy, not a loop
    assert refusal(ME, PeerSpec(BIRD, 64600, "global", in_cluster=False, accept_routes=False), route) == POLICY


def test_best_path_counts_a_set_as_one() -> None:
    rib = Rib()
    rib.update("p1", [LearnedRoute("198.51.100.0/24", "p1", "10.0.0.1", as_path=(1, 2, 3))])
    rib.update("p2", [LearnedRoute("198.51.100.0/24", "p2", "10.0.0.2", as_path=(1, (2, 3, 4, 5)))])
    assert rib.best()["198.51.100.0/24"].peer == "10.0.0.2"
