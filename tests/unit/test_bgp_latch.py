"""When BGP counts as caught up after a start (``BgpLatch``): every peer up for ``settle`` seconds, or
``startup_grace`` passed; then it stays so. Before it, only prefixes BGP delivered and then withdrew in this run may
leave the kernel; readiness as calico-node's ``-bird-ready``."""

from __future__ import annotations

from agent.router.bgp_latch import BgpLatch
from bgp.rib import LearnedRoute
from bgp.session import PeerState


def peer(address: str, state: str) -> PeerState:
    return PeerState(address, "node-to-node mesh", address, state, "", "", 64512)


def route(prefix: str) -> LearnedRoute:
    return LearnedRoute(prefix, "192.168.77.12", "192.168.77.12")


def test_in_sync_once_every_peer_is_up_for_settle_seconds_and_then_it_latches() -> None:
    latch = BgpLatch("n1", settle=2.0, startup_grace=30.0, now=100.0)
    assert not latch.check(None, 100.0)  # no speaker yet
    assert latch.recheck_at == 130.0  # the grace period's end
    assert not latch.check([peer("a", "Established"), peer("b", "Active")], 101.0)
    assert not latch.check([peer("a", "Established"), peer("b", "Invalid")], 102.0)  # Invalid: not waited for
    assert latch.recheck_at == 104.0
    assert not latch.check([peer("a", "Established"), peer("b", "Established")], 103.9)
    assert latch.check([peer("a", "Established"), peer("b", "Established")], 104.0)
    assert latch.recheck_at is None
    assert latch.check([peer("a", "Active")], 105.0)  # latched: a later flap changes nothing


def test_a_peer_going_down_before_settle_starts_the_wait_again() -> None:
    latch = BgpLatch("n1", settle=2.0, startup_grace=30.0, now=0.0)
    latch.check([peer("a", "Established")], 1.0)
    latch.check([peer("a", "Active")], 2.0)
    assert not latch.check([peer("a", "Established")], 3.5)
    assert latch.recheck_at == 5.5
    assert latch.check([peer("a", "Established")], 5.5)


def test_startup_grace_ends_the_wait_even_with_peers_down_and_start_restarts_it() -> None:
    latch = BgpLatch("n1", settle=2.0, startup_grace=30.0, now=0.0)
    latch.start(10.0)
    assert not latch.check([peer("a", "Active")], 39.9)
    assert latch.check([peer("a", "Active")], 40.0)


def test_withdrawn_is_what_this_run_delivered_and_lost_until_in_sync() -> None:
    latch = BgpLatch("n1", settle=2.0, startup_grace=30.0, now=0.0)
    assert latch.withdrawn([route("10.244.2.0/26"), route("10.244.3.0/26")]) == set()
    assert latch.withdrawn([route("10.244.3.0/26")]) == {"10.244.2.0/26"}
    assert latch.withdrawn([]) == {"10.244.2.0/26", "10.244.3.0/26"}
    latch.check([], 1.0)
    latch.check([], 3.0)
    assert latch.in_sync
    assert latch.withdrawn([route("10.244.4.0/26")]) == set()  # any missing route goes now: nothing kept
    assert latch.seen == set()


def test_readiness_like_bird_ready() -> None:
    latch = BgpLatch("n1", settle=2.0, startup_grace=30.0, now=0.0)
    assert latch.readiness([], 1.0) == (True, "bgp: no peers configured")
    assert latch.readiness([peer("a", "Invalid")], 1.0) == (True, "bgp: no peers configured")
    two = [peer("a", "Established"), peer("b", "Active")]
    assert latch.readiness(two, 1.0) == (False, "bgp: 1 of 2 peers established")  # in the grace: all of them
    assert latch.readiness(two, 31.0) == (True, "bgp: 1 of 2 peers established")  # after it: one is enough
    assert latch.readiness([peer("a", "Active")], 31.0) == (False, "bgp: 0 of 1 peers established")
