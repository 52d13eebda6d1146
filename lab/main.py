"""Entry point of `podnet-lab`: bring up a cluster on this machine and run a scenario against it.

    podnet-lab run [--scenario FILE] [--encapsulation vxlan|none] [-o table|json] [--phase-timeout S] [--keep]

Each phase changes NetworkPolicies through `agentctl` (as a user would), asks `agentctl policy matrix` what every
pod should reach, and probes every pod pair with real connections until the kernels agree or the phase's time is
up. Prints each phase's matrix and the time the cluster took to get there; exits 0 only if every phase converged.
Needs root (network namespaces). Everything it starts is stopped and removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from datastore import cli_options as opt
from lab.cluster import Cluster, LabError
from lab.report import Pair, expected_from_json, mismatches, render
from lab.scenario import Phase, ScenarioError, load

FIRST_PHASE_TIMEOUT = 90.0  # BGP sessions and every node's routes and rules come up during the first phase
PHASE_TIMEOUT = 20.0


def _agentctl(endpoint: str, *args: str, stdin: str | None = None) -> str:
    cmd = [sys.executable, "-m", "agent.ctl.main", "--etcd-endpoints", endpoint, *args]
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise LabError(f"agentctl {' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def _change(cluster: Cluster, phase: Phase) -> None:
    if phase.apply:
        _agentctl(cluster.endpoint, "apply", "-f", "-", stdin=phase.apply)
    for ref in phase.delete:
        ns, name = ref.split("/")
        doc = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "metadata": {"name": name, "namespace": ns}}  # fmt: skip
        _agentctl(cluster.endpoint, "delete", "-f", "-", stdin=json.dumps(doc))


def run_phase(cluster: Cluster, phase: Phase, timeout: float) -> dict[str, Any]:
    """Apply the phase's change, then probe until the kernels match the compiler on every port twice in a row (a
    passing glimpse is not convergence) or ``timeout`` runs out. ``seconds``: from the change being in etcd to the
    first of the two matching sweeps."""
    _change(cluster, phase)
    t0 = time.monotonic()
    expected: dict[str, dict[Pair, bool]] = {}
    for port, proto in phase.ports:
        hosts = ["--host", cluster.outside.ip] if cluster.outside is not None else []
        cmd = ["policy", "matrix", "--port", f"{port}/{proto}", *hosts, "-o", "json"]
        doc = json.loads(_agentctl(cluster.endpoint, *cmd))
        expected[f"{port}/{proto}"] = expected_from_json(doc)
    matched_at: float | None = None
    while True:
        observed = {f"{p}/{proto}": cluster.probe(p, proto) for p, proto in phase.ports}
        wrong = {k: mismatches(expected[k], observed[k]) for k in expected}
        if any(wrong.values()):
            matched_at = None
        elif matched_at is None:
            matched_at = time.monotonic()
            continue  # confirm with one more sweep
        else:
            break
        if time.monotonic() - t0 > timeout:
            break
        time.sleep(0.1)
    results = [{"port": k, "expected": expected[k], "observed": observed[k], "wrong": wrong[k]} for k in expected]
    converged = matched_at is not None
    seconds = (matched_at if matched_at is not None else time.monotonic()) - t0
    return {"phase": phase.name, "converged": converged, "seconds": seconds, "ports": results}


def _print_phase(i: int, res: dict[str, Any], pods: list[str]) -> None:
    verdict = "as expected" if res["converged"] else "DIFFERENT from the policy compiler"
    print(f"\n== phase {i}: {res['phase']}\n   kernels {verdict} after {res['seconds'] * 1000:.0f} ms")
    for r in res["ports"]:
        allowed = sum(r["observed"].values())
        print(f"\n   {r['port']}: {allowed} of {len(r['observed'])} pairs reach")
        print("   " + render(pods, r["expected"], r["observed"]).replace("\n", "\n   "))
        for src, dst in r["wrong"]:
            want = "allowed" if r["expected"].get((src, dst)) else "denied"
            print(f"   ! {src} -> {dst}: the compiler says {want}, the kernel did the opposite")


def _json_phase(res: dict[str, Any]) -> dict[str, Any]:
    def pairs(d: dict[Pair, bool]) -> dict[str, bool]:
        return {f"{s} -> {t}": v for (s, t), v in sorted(d.items())}

    return {
        "phase": res["phase"],
        "converged": res["converged"],
        "ms": round(res["seconds"] * 1000),
        "ports": [
            {"port": r["port"], "observed": pairs(r["observed"]), "wrong": [f"{s} -> {t}" for s, t in r["wrong"]]}
            for r in res["ports"]
        ],
    }


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    try:
        scenario = load(args.scenario, encapsulation=args.encapsulation)
    except ScenarioError as exc:
        print(f"podnet-lab: {exc}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("podnet-lab: needs root (it creates network namespaces)", file=sys.stderr)
        return 2
    # SIGTERM ends the run like Ctrl-C: through the finally below, which removes everything.
    signal.signal(signal.SIGTERM, _interrupt)
    results = []
    cluster = Cluster(scenario, args.workdir)
    try:
        cluster.start()
        cluster.add_pods()
        pods = cluster.participants()
        if args.output == "table":
            print(f"podnet lab: scenario {scenario.name!r}, {len(scenario.nodes)} nodes, {len(cluster.pods)} pods")
            for n, key in enumerate(pods, start=1):
                where = (
                    f"node {cluster.pods[key].spec.node:<6} {cluster.pods[key].ip}"
                    if key in cluster.pods
                    else "outside"
                )
                print(f"  {n:>2} {key:<24} {where}")
        for i, phase in enumerate(scenario.phases):
            res = run_phase(cluster, phase, FIRST_PHASE_TIMEOUT if i == 0 else args.phase_timeout)
            results.append(res)
            if args.output == "table":
                _print_phase(i, res, pods)
        if args.keep:
            print(f"\nlab running: etcdctl --endpoints {cluster.endpoint} get --prefix /podnet/v1/routes/ ; "
                  f"agentctl --etcd-endpoints {cluster.endpoint} --node-name {scenario.nodes[0]} status ; "
                  "Ctrl-C ends it", flush=True)  # fmt: skip
            signal.pause()
    except KeyboardInterrupt:
        print("podnet-lab: interrupted; cleaning up", file=sys.stderr)
        return 130
    except LabError as exc:
        print(f"podnet-lab: {exc} (logs in {cluster.workdir})", file=sys.stderr)
        return 1
    finally:
        cluster.close()
    ok = all(r["converged"] for r in results)
    if args.output == "json":
        print(json.dumps({"scenario": scenario.name, "ok": ok, "phases": [_json_phase(r) for r in results]}, indent=1))
    else:
        n_ok = sum(r["converged"] for r in results)
        print(f"\npodnet lab: {n_ok} of {len(results)} phases as the policy compiler says")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="podnet-lab", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="bring up the cluster, run the scenario, tear everything down")
    r.add_argument("--scenario", type=Path, default=None, help="scenario YAML (default: the seed's table)")
    r.add_argument("--encapsulation", choices=["vxlan", "none"], default=None, help="override the scenario's")
    r.add_argument("-o", "--output", choices=["table", "json"], default="table", help="report format (default: table)")
    # Not an etcd deadline (agentctl's old --timeout was one): hence its own name.
    opt.add_option(r, "--phase-timeout", "Seconds each phase after the first may take to converge.",
                   default=PHASE_TIMEOUT, aliases=("--timeout",), env=False, type=float, metavar="SECONDS")  # fmt: skip
    r.add_argument("--workdir", type=Path, default=None, help="keep logs here (default: a temporary directory)")
    r.add_argument("--keep", action="store_true", help="keep the cluster running after the scenario until Ctrl-C")
    return ap


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
