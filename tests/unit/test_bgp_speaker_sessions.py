"""The speaker's view of sessions and received routes, driven by a scripted ExaBGP on the other end of the bridge
socket (the speaker's real reader thread, no network): a session whose configuration changed is never reported
Established from what ExaBGP said about the session it replaced; routes with our own AS on their path are
refused and counted. The events are lines recorded from ExaBGP 5.0.15 (tests/unit/fixtures)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

import bgp.reconciler as reconciler_module
from bgp import events
from bgp.link import BridgeLink
from bgp.plan import PeerSpec, SpeakerIdentity
from bgp.speaker import Speaker, SpeakerConfig
from bgp.sync import parse_neighbors

FIXTURE = Path(__file__).parent / "fixtures" / "exabgp_events.jsonl"
ME = SpeakerIdentity("a", "192.168.77.11", 64512, "192.168.77.11")
PEER = PeerSpec("192.168.77.30", 64600, "global", password="old", in_cluster=False, accept_routes=True)


def recorded(kind: str, peer: str, **match: str) -> str:
    """A line ExaBGP wrote to node a about ``peer``."""
    for rec in map(json.loads, FIXTURE.read_text().splitlines()):
        doc = json.loads(rec["line"])
        n = doc.get("neighbor", {})
        if (rec["node"], doc["type"], n["address"]["peer"]) == ("a", kind, peer) and all(
            n.get(k) == v for k, v in match.items()
        ):
            return str(rec["line"])
    raise LookupError((kind, peer, match))


def neighbors(up: bool) -> str:
    return json.dumps([{"peer": {"address": PEER.address}, "fsm": "established" if up else "active"}])


class ScriptedExabgp:
    """The bridge's side of the socket: says hello, then answers each command with the next lines scripted for it
    (written in one go, as ExaBGP writes an ack and the events that follow it)."""

    def __init__(self, sock: socket.socket, script: dict[str, list[list[str]]]) -> None:
        self.sock, self.script = sock, script
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.sock.sendall(b"hello 4242\n")
        with self.sock.makefile("r") as lines:
            for line in lines:
                replies = self.script[line.strip()].pop(0) if self.script.get(line.strip()) else ["ack done"]
                self.sock.sendall(("\n".join(replies) + "\n").encode())


@pytest.fixture
def wired(tmp_path: Path) -> Iterator[Callable[[dict[str, list[list[str]]]], tuple[Speaker, BridgeLink]]]:
    """A speaker (not started: no ExaBGP process) whose reader thread reads a scripted bridge."""
    socks: list[socket.socket] = []

    def make(script: dict[str, list[list[str]]]) -> tuple[Speaker, BridgeLink]:
        sp = Speaker(SpeakerConfig(ME), tmp_path)
        sp.set_peers([PEER])  # in the file ExaBGP started with
        sp._exabgp_alive = True  # as if ExaBGP were running: what it relays is current
        ours, theirs = socket.socketpair()
        socks.extend((ours, theirs))
        conn = BridgeLink(ours)
        threading.Thread(target=sp._bridge.read, args=(conn,), daemon=True).start()
        ScriptedExabgp(theirs, script)
        assert wait(lambda: conn.bridge_pid == 4242)
        return sp, conn

    yield make
    for s in socks:
        s.close()


def wait(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return False


def state(sp: Speaker) -> str:
    [p] = sp.peer_status()
    return p.state


def feed(sp: Speaker, line: str) -> bool:
    event = events.parse(line)
    assert event is not None
    with sp._lock:
        return sp._table.apply(event)


@pytest.mark.parametrize("resync", [False, True], ids=["password-change", "bridge-restart"])
def test_a_snapshot_written_before_the_session_went_down_does_not_bring_it_back(
    wired: Callable[[dict[str, list[list[str]]]], tuple[Speaker, BridgeLink]],
    monkeypatch: pytest.MonkeyPatch,
    resync: bool,
) -> None:
    # ExaBGP answers "show neighbor" while the old session is still up, then tears it down and says so.
    sp, conn = wired(
        {
            "show neighbor json": [
                [f"text {neighbors(up=True)}", "ack done", "event " + recorded("state", PEER.address, state="down")]
            ]
        }
    )
    feed(sp, recorded("state", PEER.address, state="up"))
    assert state(sp) == "Established"
    sp.set_peers([replace(PEER, password="new")])  # the session is re-created, with a password the peer lacks
    assert state(sp) != "Established"

    def late(text: list[str]) -> dict[str, bool] | None:
        time.sleep(0.3)  # the worker is descheduled between the ack and applying it: the reader goes on
        return parse_neighbors(text)

    monkeypatch.setattr(reconciler_module, "parse_neighbors", late)
    sp._worker.reload(conn, resync)  # returns after the down event was read (0.3 s)
    time.sleep(0.1)
    assert state(sp) != "Established", "a session reported up from a snapshot older than its down event"
    assert "shutting down" in sp.peer_status()[0].info  # the down event's reason


def test_an_up_from_the_replaced_session_is_not_taken_for_the_new_one(
    wired: Callable[[dict[str, list[list[str]]]], tuple[Speaker, BridgeLink]],
) -> None:
    # The old session comes up just before ExaBGP reloads; the new one (wrong password) never does.
    up = "event " + recorded("state", PEER.address, state="up")
    down_snapshot = [f"text {neighbors(up=False)}", "ack done"]
    sp, conn = wired({"reload": [[up, "ack done"]], "show neighbor json": [down_snapshot]})
    sp.set_peers([replace(PEER, password="new")])
    sp._worker.reload(conn)
    time.sleep(0.1)
    assert state(sp) != "Established"
    # once ExaBGP has reloaded, an "up" is the new session's
    feed(sp, recorded("state", PEER.address, state="up"))
    assert state(sp) == "Established"


def test_routes_with_our_own_as_on_the_path_are_refused_and_counted(tmp_path: Path) -> None:
    sp = Speaker(SpeakerConfig(ME), tmp_path)
    sp.set_peers([PEER])
    feed(sp, recorded("state", PEER.address, state="up"))
    for line in FIXTURE.read_text().splitlines():
        rec = json.loads(line)
        if rec["node"] == "a" and json.loads(rec["line"])["type"] == "update":
            feed(sp, rec["line"])
    # BIRD sent 198.51.100.0/24 (64600 65010 65011) and 10.244.9.0/26 (64600 64512): ours is 64512
    assert {p: r.as_path for p, r in sp.best_routes().items()} == {"198.51.100.0/24": (64600, 65010, 65011)}
    assert sp.rejected_as_loop == 1
    assert sp.rejected_routes() == {"as-loop": {PEER.address: 1}}
    [status] = sp.peer_status()
    assert status.prefixes_received == 1
