"""`podnet-lab run` end to end: three nodes (real etcd, ExaBGP, routes, CNI, iptables + ipset), the seed scenario's
phases applied through agentctl, every pod pair probed. Besides the lab's own verdict (kernels = compiler), the
test checks cells it knows independently, and that nothing the lab created is left behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.netns import list_netns

pytestmark = pytest.mark.netns

BIN = Path(sys.executable).parent


def _cell(phase: dict[str, object], port: str, pair: str) -> bool:
    [entry] = [p for p in phase["ports"] if p["port"] == port]  # type: ignore[attr-defined]
    return bool(entry["observed"][pair])


def test_seed_scenario_runs_converges_and_cleans_up(tmp_path: Path) -> None:
    before = set(list_netns())
    proc = subprocess.run(
        [str(BIN / "podnet-lab"), "run", "-o", "json", "--workdir", str(tmp_path / "lab")],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((tmp_path / "lab").glob("*.log")))
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{logs}"
    report = json.loads(proc.stdout)
    assert report["ok"] is True
    phases = {p["phase"].split(":")[0]: p for p in report["phases"]}
    assert len(phases) == 8 and all(p["converged"] and not any(x["wrong"] for x in p["ports"]) for p in phases.values())

    # no policy: across nodes (a1 on n1, d2 on n3) and on one node (a1, b1 on n1)
    assert _cell(phases["no policy"], "80/TCP", "nsa/a1 -> default/d2")
    assert _cell(phases["no policy"], "80/TCP", "nsb/b1 -> nsa/a1")
    # 1: nsa isolated, same namespace allowed (a2 on n2 -> a1 on n1), others refused
    assert _cell(phases["1"], "80/TCP", "nsa/a2 -> nsa/a1")
    assert not _cell(phases["1"], "80/TCP", "nsb/b1 -> nsa/a1")
    assert not _cell(phases["1"], "80/TCP", "default/d2 -> nsa/a2")
    assert _cell(phases["1"], "80/TCP", "nsa/a1 -> nsb/b2")  # egress is not restricted
    # 2: same namespace isolated too
    assert not _cell(phases["2"], "80/TCP", "nsa/a2 -> nsa/a1")
    # 3: nsb whitelisted into nsa
    assert _cell(phases["3"], "80/TCP", "nsb/b2 -> nsa/a1")
    assert not _cell(phases["3"], "80/TCP", "default/d1 -> nsa/a1")
    # 5: nsb reaches nsa only on 6379/TCP
    assert _cell(phases["5"], "6379/TCP", "nsb/b1 -> nsa/a2")
    assert not _cell(phases["5"], "80/TCP", "nsb/b1 -> nsa/a2")
    assert not _cell(phases["5"], "6379/TCP", "default/d1 -> nsa/a1")
    # 4: nsa's egress only to the outside network on 5978/TCP (the outside host is behind the underlay's router)
    out = "198.51.100.7"
    assert _cell(phases["4"], "5978/TCP", f"nsa/a1 -> {out}") and _cell(phases["4"], "5978/TCP", f"nsa/a2 -> {out}")
    assert not _cell(phases["4"], "80/TCP", f"nsa/a1 -> {out}")
    assert not _cell(phases["4"], "5978/TCP", "nsa/a1 -> nsb/b1")
    assert _cell(phases["4"], "80/TCP", f"nsb/b1 -> {out}") and _cell(phases["4"], "80/TCP", f"{out} -> nsa/a1")
    # seed 5: default accepts only the outside network on 80/TCP
    assert _cell(phases["seed 5"], "80/TCP", f"{out} -> default/d1")
    assert not _cell(phases["seed 5"], "6379/TCP", f"{out} -> default/d2")
    assert not _cell(phases["seed 5"], "80/TCP", "nsa/a1 -> default/d1")
    assert not _cell(phases["seed 5"], "80/TCP", "default/d2 -> default/d1")
    assert _cell(phases["seed 5"], "80/TCP", "default/d1 -> nsa/a1")
    # policies deleted: open again
    assert all(_cell(phases["policies deleted"], "80/TCP", f"{s} -> nsa/a1") for s in ("nsb/b1", "default/d2", out))

    assert set(list_netns()) == before, "the lab left network namespaces behind"
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path / "lab")], capture_output=True, text=True, check=False)
    assert leftover.stdout.strip() == "", "the lab left processes behind"


def test_a_bad_scenario_is_refused_before_anything_starts(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes: [n1]\npods:\n  - {name: nsa/a1, node: n9}\n")
    before = set(list_netns())
    proc = subprocess.run(
        [str(BIN / "podnet-lab"), "run", "--scenario", str(bad)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2
    assert "node 'n9' is not one of" in proc.stderr
    assert set(list_netns()) == before
