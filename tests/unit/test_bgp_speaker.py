"""The speaker's supervision without a network: a missing or crashing ExaBGP is retried with backoff and shown in
the peer status; a configured peer with an error is listed as Invalid."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
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
    assert sp._table.own == {"10.244.1.0/26"}
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
        assert sp._table.apply(events.StateEvent("127.0.0.2", "up"))
        assert sp._table.apply(update)
    assert set(sp.best_routes()) == {"10.244.2.0/26"}
    with sp._lock:  # the peer went silent: its routes are dropped at once
        sp._table.apply(events.StateEvent("127.0.0.2", "down", "hold timer expired"))
    assert sp.best_routes() == {}
    with sp._lock:
        sp._table.apply(events.StateEvent("127.0.0.2", "up"))
        assert sp._table.apply(update), "the same routes learned again must count as a change"
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
    sp._table.reload_pending = False
    link = _FakeLink()
    # No bridge connected: nothing to wait for.
    t = time.monotonic()
    sp.announce(["10.244.1.0/26"], handoff=5)
    assert time.monotonic() - t < 1
    sp._running = True
    sp._conn = link  # type: ignore[assignment]
    sp._worker.step(link)  # type: ignore[arg-type]
    assert link.lines == ["neighbor 127.0.0.2 announce route 10.244.1.0/26 next-hop 127.0.0.1"]
    # A change waits until the worker has sent its first command...
    done = threading.Event()
    caller = threading.Thread(target=lambda: (sp.announce(["10.244.2.0/26"], handoff=5), done.set()))
    caller.start()
    assert not done.wait(0.3), "announce returned before the worker took the change"
    sp._worker.step(link)  # type: ignore[arg-type]
    assert done.wait(2)
    caller.join()
    assert "neighbor 127.0.0.2 announce route 10.244.2.0/26 next-hop 127.0.0.1" in link.lines
    assert "neighbor 127.0.0.2 withdraw route 10.244.1.0/26" in link.lines
    # ...an unchanged set does not wait, and a worker that never comes costs at most the handoff time.
    t = time.monotonic()
    sp.announce(["10.244.2.0/26"], handoff=5)
    sp.announce(["10.244.3.0/26"], handoff=0.2)
    assert 0.15 < time.monotonic() - t < 2


def _sleeper(*args: str) -> subprocess.Popen[bytes]:
    """A process whose command line ends in ``args`` (what /proc/PID/cmdline shows)."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *args])


def test_an_exabgp_left_by_a_previous_owner_is_killed_on_start(tmp_path: Path) -> None:
    config = SpeakerConfig(IDENT, exabgp="/bin/false", backoff_initial=0.05)
    stale = _sleeper(config.exabgp, "server", str(tmp_path / "exabgp.conf"))  # our ExaBGP, our configuration
    try:
        (tmp_path / "exabgp.pid").write_text(f"{stale.pid}\n")
        sp = Speaker(config, tmp_path)
        sp.start()
        try:
            assert stale.wait(timeout=5) == -signal.SIGKILL
        finally:
            sp.stop()
    finally:
        stale.kill()
        stale.wait()


def test_a_pidfile_naming_another_process_kills_nothing(tmp_path: Path) -> None:
    config = SpeakerConfig(IDENT, exabgp="/bin/false", backoff_initial=0.05)
    others = [
        _sleeper(config.exabgp, "server", str(tmp_path / "elsewhere" / "exabgp.conf")),  # another speaker's
        _sleeper("not-exabgp", "server", str(tmp_path / "exabgp.conf")),
    ]
    try:
        for other in others:
            (tmp_path / "exabgp.pid").write_text(f"{other.pid}\n")
            sp = Speaker(config, tmp_path)
            sp.start()
            sp.stop()
            assert other.poll() is None, "a process that is not our ExaBGP was killed"
    finally:
        for other in others:
            other.kill()
            other.wait()


def test_exabgp_dies_with_its_owner(tmp_path: Path) -> None:
    # The owner is a child process that starts a speaker whose "ExaBGP" runs and ignores SIGTERM; then it is
    # SIGKILLed, as the kernel's OOM killer or a kubelet would: nothing may stay running.
    fake = tmp_path / "exabgp"
    fake.write_text("#!/bin/sh\ntrap '' TERM\nexec sleep 60\n")
    fake.chmod(0o755)
    owner_code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from bgp.plan import SpeakerIdentity\n"
        "from bgp.speaker import Speaker, SpeakerConfig\n"
        "sp = Speaker(SpeakerConfig(SpeakerIdentity('a', '127.0.0.1', 64512, '127.0.0.1'), exabgp=sys.argv[1]),"
        " Path(sys.argv[2]))\n"
        "sp.start()\n"
        "time.sleep(60)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", owner_code, str(fake), str(tmp_path)])
    child: int | None = None
    try:
        assert eventually(lambda: bool(_children(owner.pid)), timeout=10)
        [child] = _children(owner.pid)
        assert eventually(lambda: Path(f"/proc/{child}/comm").read_text().strip() == "sleep", timeout=10)
        owner.kill()
        owner.wait()
        assert eventually(lambda: not _running(child), timeout=5), "ExaBGP outlived its owner"
    finally:
        owner.kill()
        owner.wait()
        if child is not None and _running(child):
            os.kill(child, signal.SIGKILL)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for whoever adopted it to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def test_health_info_counts_peers_and_beats_while_exabgp_runs(tmp_path: Path) -> None:
    fake = tmp_path / "deaf-exabgp"
    fake.write_text("#!/bin/sh\nexec sleep 60\n")
    fake.chmod(0o755)
    sp = Speaker(SpeakerConfig(IDENT, exabgp=str(fake), bridge_timeout=60), tmp_path)
    sp.set_peers(PEERS)
    sp.start()
    try:
        assert eventually(lambda: sp.health_info().exabgp_running, timeout=5)
        time.sleep(4.5)  # longer than any wait of the supervision and worker loops
        health = sp.health_info()
        assert time.monotonic() - health.last_progress < 3, health
        assert (health.exabgp_running, health.bridge_connected, health.established, health.configured) == (
            True,
            False,
            0,
            1,  # the Invalid peer has no session to wait for
        )
    finally:
        sp.stop()
