"""Reflection and RIB rules: what a node sends each peer, loop prevention, best path, graceful-restart staleness."""

from __future__ import annotations

from bgp.commands import OutRoute
from bgp.outbound import accepts, outbound
from bgp.plan import GLOBAL, MESH, REFLECTOR, RR_CLIENT, PeerSpec, SpeakerIdentity
from bgp.rib import LearnedRoute, Rib

RR = SpeakerIdentity("rr", "10.0.0.1", 64512, "10.0.0.1", cluster_id="1.0.0.1")
PLAIN = SpeakerIdentity("a", "10.0.0.11", 64512, "10.0.0.11")


def client(ip: str) -> PeerSpec:
    return PeerSpec(ip, 64512, RR_CLIENT, rr_client=True)


def reflector(ip: str) -> PeerSpec:
    return PeerSpec(ip, 64512, REFLECTOR)


def test_plain_node_sends_only_its_own_prefixes() -> None:
    rib = Rib()
    rib.update("10.0.0.12", [LearnedRoute("10.244.2.0/26", "10.0.0.12", "10.0.0.12")])
    peers = [PeerSpec("10.0.0.12", 64512, MESH), PeerSpec("10.0.0.13", 64512, MESH)]
    out = outbound(PLAIN, peers, ["10.244.1.0/26"], rib, {})
    own = OutRoute("10.244.1.0/26", "10.0.0.11")
    assert out == {"10.0.0.12": {"10.244.1.0/26": own}, "10.0.0.13": {"10.244.1.0/26": own}}


def test_reflector_reflects_client_routes_to_clients_and_reflectors_not_back() -> None:
    rib = Rib()
    rib.update("10.0.0.11", [LearnedRoute("10.244.1.0/26", "10.0.0.11", "10.0.0.11", local_pref=100)])
    peers = [
        client("10.0.0.11"),
        client("10.0.0.12"),
        reflector("10.0.0.2"),
        PeerSpec("9.9.9.9", 65000, GLOBAL, in_cluster=False),
    ]
    out = outbound(RR, peers, [], rib, {"10.0.0.11": "10.0.0.11"})
    reflected = OutRoute("10.244.1.0/26", "10.0.0.11", 100, (), "10.0.0.11", ("1.0.0.1",))
    assert out["10.0.0.12"] == {"10.244.1.0/26": reflected}
    assert out["10.0.0.2"] == {"10.244.1.0/26": reflected}
    assert out["10.0.0.11"] == {}  # never back to the originator
    assert out["9.9.9.9"] == {}  # not to an external peer


def test_reflector_sends_non_client_routes_to_clients_only_and_keeps_originator() -> None:
    rib = Rib()
    rib.update(
        "10.0.0.2",
        [LearnedRoute("10.244.9.0/26", "10.0.0.19", "10.0.0.2", originator_id="10.0.0.19", cluster_list=("1.0.0.2",))],
    )
    peers = [client("10.0.0.11"), client("10.0.0.19"), reflector("10.0.0.2"), reflector("10.0.0.3")]
    out = outbound(RR, peers, [], rib, {})
    sent = out["10.0.0.11"]["10.244.9.0/26"]
    assert (sent.originator_id, sent.cluster_list, sent.next_hop) == ("10.0.0.19", ("1.0.0.1", "1.0.0.2"), "10.0.0.19")
    assert out["10.0.0.3"] == {}  # non-client to non-client: not reflected
    assert out["10.0.0.19"] == {}  # the originator (by router ID) gets nothing back


def test_own_prefix_wins_over_a_reflected_one() -> None:
    rib = Rib()
    rib.update("10.0.0.11", [LearnedRoute("10.244.1.0/26", "10.0.0.11", "10.0.0.11")])
    out = outbound(RR, [client("10.0.0.11"), client("10.0.0.12")], ["10.244.1.0/26"], rib, {})
    assert out["10.0.0.12"]["10.244.1.0/26"] == OutRoute("10.244.1.0/26", "10.0.0.1")


def test_loop_prevention_and_policy() -> None:
    peer = reflector("10.0.0.2")
    assert accepts(RR, peer, LearnedRoute("p", "n", "10.0.0.2"))
    assert not accepts(RR, peer, LearnedRoute("p", "n", "10.0.0.2", originator_id="10.0.0.1"))
    assert not accepts(RR, peer, LearnedRoute("p", "n", "10.0.0.2", cluster_list=("9.9.9.9", "1.0.0.1")))
    assert accepts(PLAIN, peer, LearnedRoute("p", "n", "10.0.0.2", cluster_list=("1.0.0.1",)))
    assert not accepts(
        PLAIN,
        PeerSpec("9.9.9.9", 65000, GLOBAL, in_cluster=False, accept_routes=False),
        LearnedRoute("p", "n", "9.9.9.9"),
    )


def test_best_path_and_staleness() -> None:
    rib = Rib()
    rib.update("10.0.0.3", [LearnedRoute("p/26", "10.0.0.3", "10.0.0.3")])
    rib.update("10.0.0.2", [LearnedRoute("p/26", "10.0.0.2", "10.0.0.2", cluster_list=("1.1.1.1",))])
    assert rib.best()["p/26"].peer == "10.0.0.3"  # shorter cluster list
    rib.update("10.0.0.9", [LearnedRoute("p/26", "10.0.0.9", "10.0.0.9", local_pref=200)])
    assert rib.best()["p/26"].peer == "10.0.0.9"  # local-pref first
    rib.drop_peer("10.0.0.9")
    rib.update("10.0.0.2", [LearnedRoute("p/26", "10.0.0.2", "10.0.0.2")])
    assert rib.best()["p/26"].peer == "10.0.0.2"  # tie: lowest address (numerically)

    rib.mark_stale("10.0.0.2")
    assert rib.best()["p/26"].peer == "10.0.0.3"  # fresh beats stale
    assert rib.has_stale("10.0.0.2")
    rib.update("10.0.0.2", [LearnedRoute("p/26", "10.0.0.2", "10.0.0.2")])  # re-learned: fresh again
    rib.mark_stale("10.0.0.3")
    rib.update("10.0.0.3", [LearnedRoute("q/26", "10.0.0.3", "10.0.0.3")])
    assert rib.sweep_stale("10.0.0.3") == 1  # End-of-RIB: what was not re-sent goes
    assert set(rib.routes_from("10.0.0.3")) == {"q/26"}
    assert not rib.best()["p/26"].stale


def test_speaker_diff_groups_commands_and_withdraws_what_it_is_unsure_of() -> None:
    from bgp.sync import diff as _diff

    own = OutRoute("10.244.1.0/26", "10.0.0.11")
    refl = OutRoute("10.244.2.0/26", "10.0.0.12", None, (), "10.0.0.12", ("1.0.0.1",))
    desired = {"10.0.0.2": {own.prefix: own, refl.prefix: refl}, "10.0.0.3": {own.prefix: own}}
    sent = {"10.0.0.3": {own.prefix: own, "10.244.9.0/26": OutRoute("10.244.9.0/26", "10.0.0.11")}}
    unsure = {"10.0.0.2": {"10.244.8.0/26"}}
    lines = [line for line, _ in _diff(desired, sent, unsure)]
    assert lines == [
        "neighbor 10.0.0.2 withdraw route 10.244.8.0/26",
        "neighbor 10.0.0.3 withdraw route 10.244.9.0/26",
        "neighbor 10.0.0.2 announce route 10.244.1.0/26 next-hop 10.0.0.11",  # 10.0.0.3 has it already
        "neighbor 10.0.0.2 announce route 10.244.2.0/26 next-hop 10.0.0.12 originator-id 10.0.0.12 "
        "cluster-list [ 1.0.0.1 ]",
    ]
    assert _diff(desired, {a: dict(r) for a, r in desired.items()}, {}) == []


def test_speaker_diff_skips_a_route_it_cannot_express() -> None:
    from bgp.sync import diff

    odd = OutRoute("10.244.3.0/26", "10.0.0.13", cluster_list=("not-an-id",))
    good = OutRoute("10.244.1.0/26", "10.0.0.11")
    lines = [line for line, _ in diff({"10.0.0.2": {odd.prefix: odd, good.prefix: good}}, {}, {})]
    assert lines == ["neighbor 10.0.0.2 announce route 10.244.1.0/26 next-hop 10.0.0.11"]


def test_best_for_agrees_with_best() -> None:
    import random

    rng = random.Random(7)
    rib = Rib()
    peers = [f"10.0.0.{i}" for i in range(1, 6)]
    prefixes = [f"10.244.{i}.0/26" for i in range(20)]
    for _ in range(300):
        peer, prefix = rng.choice(peers), rng.choice(prefixes)
        if rng.random() < 0.3:
            rib.update(peer, (), [prefix])
        else:
            lp = rng.choice([None, 100, 200])
            rib.update(
                peer, [LearnedRoute(prefix, peer, peer, local_pref=lp, cluster_list=("1.1.1.1",) * rng.randint(0, 2))]
            )
        if rng.random() < 0.05:
            rib.mark_stale(rng.choice(peers))
        best = rib.best()
        assert rib.best_for(prefixes) == {p: best.get(p) for p in prefixes}
