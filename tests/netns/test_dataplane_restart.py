"""Restart without flush: the dataplane writer process is SIGKILLed mid-life (also right after a state change) and
started again, while probes connect continuously. The isolated pod is never reachable, the allowed pod is always
reachable, a restarted writer adopts what is there without rewriting it, and no jump is ever duplicated."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.dataplane.statefile import to_json
from testbed.netns import Netns, NetnsBed
from testbed.procs import unregister_child
from tests.netns.test_dataplane_writers import PORT, chain_rules, isolate_b, make_bed, save

pytestmark = pytest.mark.netns

# Connects in a tight loop until the stop file appears, then prints "tries ok". The probe of the isolated pod gives
# up after 50 ms (a dropped SYN costs that much); the allowed pod's probe waits up to 1 s, so that a busy CPU is not
# taken for a drop.
PROBER = r"""
import os, socket, sys, time
host, port, stop, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
print("ready", flush=True)
tries = ok = 0
while not os.path.exists(stop):
    s = socket.socket()
    s.settimeout(timeout)
    try:
        s.connect((host, port))
        ok += 1
    except OSError:
        pass
    finally:
        s.close()
    tries += 1
    time.sleep(0.002)
print(tries, ok, flush=True)
"""


def start_writer(ns: Netns, state: Path, backend: str) -> tuple[subprocess.Popen[str], str]:
    proc = ns.popen(
        sys.executable,
        "-m",
        "agent.dataplane.run",
        "--state",
        str(state),
        "--sync-period",
        "0.5",
        "--iptables-backend",
        backend,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("synced "):
        err = proc.stderr.read() if proc.stderr else ""
        raise AssertionError(f"writer did not sync: {line!r} {err}")
    return proc, line.strip()


def kill9(ns: Netns, proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    unregister_child(proc.pid)
    ns.bed.processes.remove(proc)


@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_killed_writer_restarts_without_opening_anything(netns_bed: NetnsBed, tmp_path: Path, backend: str) -> None:
    bed = make_bed(netns_bed)
    state_file = tmp_path / "state.json"
    state_file.write_text(to_json(isolate_b(bed, {bed.c.ip})))
    writer, first = start_writer(bed.node.ns, state_file, backend)
    assert "full" in first and not first.endswith("wrote=0")

    stop = tmp_path / "stop"
    probers = {}
    for name, pod, timeout in (("a", bed.a, "0.05"), ("c", bed.c, "1.0")):
        probers[name] = pod.ns.popen(sys.executable, "-c", PROBER, bed.b.ip, str(PORT), str(stop), timeout)
        assert probers[name].stdout is not None and probers[name].stdout.readline().strip() == "ready"

    restarts = []
    for i in range(4):
        time.sleep(0.4)
        if i == 2:
            # Killed right after a change it may or may not have written: the next one converges to it.
            state_file.write_text(to_json(isolate_b(bed, {bed.c.ip, "10.244.9.9"})))
            time.sleep(0.01)
        kill9(bed.node.ns, writer)
        writer, line = start_writer(bed.node.ns, state_file, backend)
        restarts.append(line)
    time.sleep(0.3)  # probe the last restarted writer too
    stop.touch()

    counts = {}
    for name, proc in probers.items():
        assert proc.stdout is not None
        out, _ = proc.communicate(timeout=30)
        tries, ok = (int(x) for x in out.split())
        counts[name] = (tries, ok)
    a_tries, a_ok = counts["a"]
    c_tries, c_ok = counts["c"]
    assert a_tries >= 20 and a_ok == 0, f"isolated pod reached {a_ok} times out of {a_tries}"
    assert c_tries >= 20 and c_ok == c_tries, f"allowed pod refused {c_tries - c_ok} times out of {c_tries}"

    # A restart with an unchanged state adopts: full read-back, nothing written.
    assert all("full" in line for line in restarts)
    assert restarts[0].endswith("wrote=0") and restarts[1].endswith("wrote=0") and restarts[3].endswith("wrote=0")
    text = save(bed.node, backend)
    for chain in ("FORWARD", "INPUT", "OUTPUT"):
        rules = chain_rules(text, chain)
        assert [r for r in rules if "podnet" in r] == [f"-A {chain} -m comment --comment podnet -j podnet-{chain}"]
    assert "10.244.9.9" in bed.node.ns.run("ipset", "list", "podnet-s-allow-b").stdout

    bed.node.ns.bed.stop_process(writer)
    bed.node.ns.run(sys.executable, "-m", "agent.dataplane.run", "--remove", "--iptables-backend", backend)
    assert "podnet" not in save(bed.node, backend)
