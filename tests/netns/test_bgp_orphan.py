"""An owner that dies leaves no ExaBGP behind, and a new owner takes over: the speaker's ExaBGP (and its bridge
helper) dies with a SIGKILLed owner process, the peer sees the session drop, and a new owner in the same workdir
gets port 179 and the session back. An ExaBGP that survived anyway (started without the parent-death signal) is
found through the workdir's pidfile and replaced. Node a (passive: lower address) against a podnet speaker b."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bgp import exabgp_conf
from bgp.plan import plan_peers
from bgp.speaker import Speaker, SpeakerConfig
from datastore import model as m
from testbed.netns import NetnsBed
from testbed.procs import alive
from tests.netns.test_bgp_support import FAST, Cluster, ident_of, make_cluster, speakers, wait

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
BLOCK_A = "10.244.1.0/26"


def state(sp: Speaker, address: str) -> str:
    return next((p.state for p in sp.peer_status() if p.address == address), "missing")


def running(workdir: Path) -> dict[str, list[int]]:
    """Live processes of this workdir: ExaBGP (by its configuration file) and bridge helpers (by their socket)."""
    found: dict[str, list[int]] = {"exabgp": [], "bridge": []}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            zombie = (entry / "stat").read_text().rpartition(")")[2].split()[0] == "Z"
        except OSError:
            continue
        if zombie:
            continue
        if str(workdir / "exabgp.conf") in args and any(Path(a).name == "exabgp" for a in args):
            found["exabgp"].append(int(entry.name))
        elif "bgp.bridge" in args and str(workdir / "bridge.sock") in args:
            found["bridge"].append(int(entry.name))
    return found


def nothing_running(workdir: Path) -> bool:
    return not any(running(workdir).values())


@contextmanager
def cleanup(workdir: Path, procs: list[subprocess.Popen[bytes]]) -> Iterator[None]:
    """On the way out, whatever passed or failed: kill the owners we started and this workdir's ExaBGP/bridges."""
    try:
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for pid in [p for pids in running(workdir).values() for p in pids]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def start_owner(cl: Cluster, workdir: Path, log: Path) -> subprocess.Popen[bytes]:
    """``tests.netns.bgp_owner`` for node a, with this checkout's code (the tree this test file is in)."""
    cmd = [sys.executable, "-m", "tests.netns.bgp_owner", "a", str(workdir), cl.hosts["a"].ns.name, BLOCK_A]
    cmd += [f"{n}={cl.models[n].ip}" for n in "ab"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def test_a_killed_owner_takes_its_exabgp_along_and_a_new_owner_comes_up(netns_bed: NetnsBed, tmp_path: Path) -> None:
    cl = make_cluster(netns_bed, [("a", 11), ("b", 12)])
    a_ip = cl.models["a"].address
    workdir = tmp_path / "a"
    owners: list[subprocess.Popen[bytes]] = []
    with cleanup(workdir, owners), speakers(cl, "b") as sp:
        b = sp["b"]
        b.set_peers(plan_peers("b", cl.models, m.ClusterConfig(), (), FAST))
        owners.append(start_owner(cl, workdir, tmp_path / "owner-1.log"))
        wait(lambda: state(b, a_ip) == "Established" and BLOCK_A in b.best_routes(), 30, "b learns a's block")
        before = running(workdir)
        assert len(before["exabgp"]) == 1 and len(before["bridge"]) == 1, before

        owners[0].kill()
        owners[0].wait()
        t0 = time.monotonic()
        wait(lambda: nothing_running(workdir), 5, f"ExaBGP and bridge gone with their owner: {running(workdir)}")
        print(f"ExaBGP and bridge gone {time.monotonic() - t0:.2f} s after the owner was killed")
        wait(lambda: state(b, a_ip) != "Established", 10, "b sees the session drop")

        owners.append(start_owner(cl, workdir, tmp_path / "owner-2.log"))
        t0 = time.monotonic()
        wait(lambda: state(b, a_ip) == "Established", 30, "the new owner's ExaBGP gets port 179 and the session")
        wait(lambda: BLOCK_A in b.best_routes() and not b.best_routes()[BLOCK_A].stale, 10, "a's block re-sent")
        print(f"new owner Established with b in {time.monotonic() - t0:.2f} s")
        assert "exited" not in (tmp_path / "owner-2.log").read_text(), "the new owner's ExaBGP had to be restarted"
        assert len(running(workdir)["exabgp"]) == 1

        owners[1].terminate()  # a clean stop still works and leaves nothing behind
        assert owners[1].wait(timeout=20) == 0
        wait(lambda: nothing_running(workdir), 5, "nothing left after a clean stop")


def test_a_stale_exabgp_named_by_the_pidfile_is_replaced(netns_bed: NetnsBed, tmp_path: Path) -> None:
    cl = make_cluster(netns_bed, [("a", 11), ("b", 12)])
    a_ip = cl.models["a"].address
    ns = cl.hosts["a"].ns.name
    workdir = tmp_path / "a"
    workdir.mkdir()
    ident = ident_of(cl, "a")
    config = SpeakerConfig(ident, backoff_initial=0.2)
    peers = plan_peers("a", cl.models, m.ClusterConfig(), (), FAST)
    # An ExaBGP as an older speaker started it (no parent-death signal), left running by an owner that died.
    conf = workdir / "exabgp.conf"
    conf.write_text(
        exabgp_conf.render(ident, peers, exabgp_conf.bridge_command(config.python, workdir / "bridge.sock"))
    )
    env = {
        **os.environ,
        "exabgp_daemon_user": "root",
        "exabgp_daemon_drop": "false",
        "exabgp_daemon_daemonize": "false",
        "exabgp_tcp_bind": a_ip,
        "exabgp_tcp_port": "179",
        "exabgp_api_ack": "true",
        "exabgp_api_respawn": "true",
        "exabgp_api_cli": "false",
        "exabgp_api_encoder": "json",
        "exabgp_log_destination": "stdout",
    }
    stale_log = open(tmp_path / "stale.log", "ab")  # noqa: SIM115 (closed below; the process writes it meanwhile)
    stale = subprocess.Popen(
        ["ip", "netns", "exec", ns, config.exabgp, "server", str(conf)],
        env=env,
        stdout=stale_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    (workdir / "exabgp.pid").write_text(f"{stale.pid}\n")
    a: Speaker | None = None
    with cleanup(workdir, [stale]), speakers(cl, "b") as sp:
        try:
            b = sp["b"]
            b.set_peers(plan_peers("b", cl.models, m.ClusterConfig(), (), FAST))
            wait(lambda: state(b, a_ip) == "Established", 30, "the stale ExaBGP holds port 179 and the session")

            a = Speaker(config, workdir, netns=ns)
            a.start()
            a.set_peers(peers)
            a.announce([BLOCK_A])
            try:
                stale.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pytest.fail("the stale ExaBGP named by the pidfile is still running")
            wait(lambda: state(a, cl.models["b"].address) == "Established", 30, "a's new ExaBGP is up")
            wait(lambda: BLOCK_A in b.best_routes(), 10, "b learns a's block from the new ExaBGP")
            assert a.exabgp_pid not in (None, stale.pid)
            assert a.restarts == 0, "the new ExaBGP had to be restarted"
            assert running(workdir)["exabgp"] == [a.exabgp_pid]
        finally:
            if a is not None:
                a.stop()
            stale_log.close()
