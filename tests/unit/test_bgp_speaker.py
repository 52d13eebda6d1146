"""The speaker's supervision without a network: a missing or crashing ExaBGP is retried with backoff and shown in
the peer status; a configured peer with an error is listed as Invalid."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bgp.plan import PeerSpec, SpeakerIdentity
from bgp.speaker import Speaker, SpeakerConfig
from testbed.wait import eventually

IDENT = SpeakerIdentity("a", "127.0.0.1", 64512, "127.0.0.1")
PEERS = [PeerSpec("127.0.0.2", 64512, "node-to-node mesh"), PeerSpec("127.0.0.1", 65000, "global", error="own")]


def test_missing_exabgp_is_reported_and_retried(tmp_path: Path) -> None:
    sp = Speaker(SpeakerConfig(IDENT, exabgp=str(tmp_path / "no-such-exabgp"), backoff_initial=0.05), tmp_path)
    sp.set_peers(PEERS)
    sp.start()
    try:
        assert eventually(lambda: "cannot start ExaBGP" in sp.peer_status()[0].info, timeout=5)
        states = {(p.address, p.state) for p in sp.peer_status()}
        assert states == {("127.0.0.2", "Idle"), ("127.0.0.1", "Invalid")}
    finally:
        sp.stop()
    assert not (tmp_path / "bridge.sock").exists()


def test_crashing_exabgp_is_restarted_with_backoff(tmp_path: Path) -> None:
    sp = Speaker(SpeakerConfig(IDENT, exabgp="/bin/false", backoff_initial=0.05, backoff_max=0.2), tmp_path)
    sp.set_peers(PEERS)
    sp.start()
    try:
        assert eventually(lambda: sp.restarts >= 3, timeout=5)
        assert "ExaBGP exited with code 1" in sp.peer_status()[0].info
        assert (tmp_path / "exabgp.conf").stat().st_mode & 0o777 == 0o600  # it may hold MD5 keys
    finally:
        sp.stop()


def test_bad_input_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    sp = Speaker(SpeakerConfig(IDENT), tmp_path)  # not started: validation happens in the caller's thread
    sp.announce(["10.244.1.0/26"])
    for bad in (["10.244.1.5/26"], ["10.244.1.0/26", "nonsense"], ["fd00::/64"]):
        with pytest.raises(ValueError):
            sp.announce(bad)
    assert sp._own == {"10.244.1.0/26"}
    sp.set_peers(PEERS)
    with pytest.raises(ValueError):
        sp.set_peers([PeerSpec("10.0.0.300", 64512, "global")])
    assert {p.address for p in sp.peer_status()} == {"127.0.0.2", "127.0.0.1"}


def test_routes_learned_again_after_a_session_loss_are_reported(tmp_path: Path) -> None:
    from bgp import events
    from bgp.rib import LearnedRoute

    sp = Speaker(SpeakerConfig(IDENT), tmp_path)  # not started: events are fed as the bridge reader would
    sp.set_peers(PEERS[:1])
    route = LearnedRoute("10.244.2.0/26", "127.0.0.2", "127.0.0.2")
    update = events.UpdateEvent("127.0.0.2", announced=(route,))
    with sp._lock:
        assert sp._event(events.StateEvent("127.0.0.2", "up"))
        assert sp._event(update)
    assert set(sp.best_routes()) == {"10.244.2.0/26"}
    with sp._lock:  # the peer went silent: its routes are dropped at once
        sp._event(events.StateEvent("127.0.0.2", "down", "hold timer expired"))
    assert sp.best_routes() == {}
    with sp._lock:
        sp._event(events.StateEvent("127.0.0.2", "up"))
        assert sp._event(update), "the same routes learned again must count as a change"
    assert set(sp.best_routes()) == {"10.244.2.0/26"}


def test_exabgp_without_a_bridge_is_restarted_after_the_configured_timeout(tmp_path: Path) -> None:
    # An "ExaBGP" that runs but never starts its API helper: the speaker cannot steer it and must restart it.
    fake = tmp_path / "deaf-exabgp"
    fake.write_text("#!/bin/sh\nexec sleep 60\n")
    fake.chmod(0o755)
    config = SpeakerConfig(IDENT, exabgp=str(fake), backoff_initial=0.05, bridge_timeout=0.3)
    sp = Speaker(config, tmp_path)
    sp.set_peers(PEERS)
    sp.start()
    try:
        assert eventually(lambda: sp.exabgp_pid is not None, timeout=5)
        first = sp.exabgp_pid
        assert sp.restarts == 0
        assert eventually(lambda: sp.restarts >= 1, timeout=5), "ExaBGP without a bridge was not restarted"
        assert eventually(lambda: sp.exabgp_pid not in (None, first), timeout=5)
    finally:
        sp.stop()


def test_bridge_timeout_defaults_to_15_s_and_must_be_positive() -> None:
    assert SpeakerConfig(IDENT).bridge_timeout == 15.0
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="bridge_timeout"):
            SpeakerConfig(IDENT, bridge_timeout=bad)


class _FakeLink:
    """Stands in for the bridge connection: records each command, runs ``on_sent``, acks it."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def call(self, line: str, on_sent: Callable[[], None] | None = None) -> tuple[bool, list[str]]:
        self.lines.append(line)
        if on_sent is not None:
            on_sent()
        return True, []


def test_announce_hands_a_change_to_the_worker_before_returning(tmp_path: Path) -> None:
    sp = Speaker(SpeakerConfig(IDENT), tmp_path)  # not started: the test plays the worker
    sp.set_peers(PEERS[:1])
    sp._reload_pending = False
    link = _FakeLink()
    # No bridge connected: nothing to wait for.
    t = time.monotonic()
    sp.announce(["10.244.1.0/26"], handoff=5)
    assert time.monotonic() - t < 1
    sp._running = True
    sp._conn = link  # type: ignore[assignment]
    sp._step(link)  # type: ignore[arg-type]
    assert link.lines == ["neighbor 127.0.0.2 announce route 10.244.1.0/26 next-hop 127.0.0.1"]
    # A change waits until the worker has sent its first command...
    done = threading.Event()
    caller = threading.Thread(target=lambda: (sp.announce(["10.244.2.0/26"], handoff=5), done.set()))
    caller.start()
    assert not done.wait(0.3), "announce returned before the worker took the change"
    sp._step(link)  # type: ignore[arg-type]
    assert done.wait(2)
    caller.join()
    assert "neighbor 127.0.0.2 announce route 10.244.2.0/26 next-hop 127.0.0.1" in link.lines
    assert "neighbor 127.0.0.2 withdraw route 10.244.1.0/26" in link.lines
    # ...an unchanged set does not wait, and a worker that never comes costs at most the handoff time.
    t = time.monotonic()
    sp.announce(["10.244.2.0/26"], handoff=5)
    sp.announce(["10.244.3.0/26"], handoff=0.2)
    assert 0.15 < time.monotonic() - t < 2
