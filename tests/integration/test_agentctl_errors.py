"""agentctl never answers with a traceback: every sub-command (enumerated from the click group, so a new one is
covered without editing this file) against an etcd that is down or hangs, and against keys it cannot read, ends
with one line on stderr that names etcd and a non-zero exit status. Through click's runner for the whole list, and
as an operator runs it (a new process, the console script's ``main``) for a few."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from importlib import metadata

import click
import pytest
from click.testing import CliRunner

from agent.ctl.main import cli
from datastore import keys as k
from datastore import model as m
from datastore.etcd import EtcdClient
from datastore.store import Store
from testbed.etcd_server import EtcdServer, free_port

pytestmark = pytest.mark.integration

# Commands that do not talk to etcd at all.
OFFLINE = {("version",)}
# Values for required parameters, by parameter name. A new command whose required parameter is not here fails the
# test with a usage error: add a sample.
SAMPLES = {"cidr": "10.99.0.0/16", "path": "-"}
# Options a command needs although none is required on its own (one of several): each way is run.
EXTRA = {
    ("ipam", "release"): [["--ip", "10.244.0.5"], ["--handle", "h-a"]],
    ("policy", "explain"): [["--pod", "nsa/a"], ["--from", "nsa/a", "--to", "nsa/b", "--port", "80/TCP"]],
}
MANIFEST = "apiVersion: v1\nkind: Namespace\nmetadata: {name: nsa}\n"


def leaf_commands(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            yield from leaf_commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


def invocations() -> list[list[str]]:
    """Every leaf command with its required parameters filled in; a choice argument once per choice."""
    out: list[list[str]] = []
    for path, cmd in leaf_commands(cli):
        variants = [[*path, *extra] for extra in EXTRA.get(path, [[]])]
        for param in cmd.params:
            if not param.required:
                continue
            if isinstance(param.type, click.Choice):
                values = [str(c) for c in param.type.choices]
            else:
                assert param.name is not None
                values = [SAMPLES.get(param.name, "x")]
            flag = [] if isinstance(param, click.Argument) else [param.opts[0]]
            variants = [[*v, *flag, value] for v in variants for value in values]
        out += variants
    return out


def agentctl(endpoint: str, *args: str, timeout: float = 2.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.ctl.main", "--etcd-endpoints", endpoint, "--etcd-timeout", str(timeout), *args],
        check=False,
        input=MANIFEST,
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_one_etcd_line(res: subprocess.CompletedProcess[str], what: str) -> str:
    assert "Traceback" not in res.stdout + res.stderr, f"{what}:\n{res.stderr}"
    assert res.returncode != 0, f"{what}: exit 0\n{res.stdout}"
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "etcd" in lines[0], f"{what}: stderr is not one line naming etcd:\n{res.stderr}"
    return lines[0]


def test_the_enumeration_sees_every_command() -> None:
    names = {" ".join(p) for p, _ in leaf_commands(cli)}
    assert {"status", "routes", "ipam show", "ipam release", "policy status", "get", "apply", "version"} <= names
    gets = [i for i in invocations() if i[0] == "get"]
    assert ["get", "nodes"] in gets and ["get", "endpoints"] in gets


def in_process(endpoint: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Through click's runner: the same group and error handling as the console script, without a new interpreter
    per command (about 0.3 s each here)."""
    res = CliRunner().invoke(cli, ["--etcd-endpoints", endpoint, "--etcd-timeout", "2", *args], input=MANIFEST)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        # What the console script would have printed as a traceback.
        trace = "".join(traceback.format_exception(res.exception))
        return subprocess.CompletedProcess(args, 1, res.stdout, trace)
    return subprocess.CompletedProcess(args, res.exit_code, res.stdout, res.stderr)


def test_every_command_with_etcd_down_says_so_in_one_line() -> None:
    endpoint = f"127.0.0.1:{free_port()}"  # nothing listens there: a stopped etcd
    runs = [i for i in invocations() if tuple(i) not in OFFLINE]
    assert len(runs) > 20
    for args in runs:
        line = assert_one_etcd_line(in_process(endpoint, *args), " ".join(args))
        assert line.startswith(f"Error: cannot reach etcd at {endpoint}"), line
    # The console script itself, for a few.
    for args in (["status"], ["routes"], ["get", "pods"], ["ipam", "release", "--ip", "10.244.0.5"]):
        line = assert_one_etcd_line(agentctl(endpoint, *args), " ".join(args))
        assert line.startswith(f"Error: cannot reach etcd at {endpoint}"), line
    # The commands that need no etcd still work.
    for path in OFFLINE:
        res = agentctl(endpoint, *path)
        assert res.returncode == 0 and res.stderr == "", res.stderr


def test_a_hung_etcd_times_out_in_one_line() -> None:
    with socket.socket() as hung:  # accepts connections (the kernel does), never answers
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        endpoint = f"127.0.0.1:{hung.getsockname()[1]}"
        for args in (["get", "pods"], ["status"], ["ipam", "show"], ["policy", "status"]):
            t0 = time.monotonic()
            res = agentctl(endpoint, *args, timeout=0.5)
            elapsed = time.monotonic() - t0
            line = assert_one_etcd_line(res, " ".join(args))
            assert "timeout 0.5 s" in line and elapsed < 5, (line, elapsed)


def test_version() -> None:
    want = f"agentctl (podnet) {metadata.version('podnet')}"
    for args in (["version"], ["--version"]):
        res = agentctl("127.0.0.1:1", *args)
        assert (res.returncode, res.stdout.strip(), res.stderr) == (0, want, "")


def test_unreadable_keys(etcd_server: EtcdServer, etcd: EtcdClient) -> None:
    Store(etcd).put(m.Pod("nsa", "good", node="n1"))
    # A key outside the layout and a value that is not a pod: listed around, with one warning line each.
    etcd.put(f"{k.PODS_PREFIX}nsa/extra/segment", b"{}")
    etcd.put(f"{k.PODS_PREFIX}nsa/bad", b'{"namespace": "nsa", "na')
    res = agentctl(etcd_server.endpoint, "get", "pods")
    assert res.returncode == 0 and "Traceback" not in res.stderr
    assert [line.split(" | ")[1].strip() for line in res.stdout.splitlines()[2:]] == ["good"]
    warnings = sorted(res.stderr.splitlines())
    assert len(warnings) == 2, res.stderr
    assert warnings[0].startswith(f"skipping malformed value at {k.PODS_PREFIX}nsa/bad: not valid JSON")
    assert warnings[1].startswith(f"skipping malformed value at {k.PODS_PREFIX}nsa/extra/segment: ")
    # A key that is not UTF-8 (only a foreign writer makes one): whatever reads it, one line, never a traceback.
    etcd_server.etcdctl("put", f"{k.PODS_PREFIX}nsa/" + os.fsdecode(b"\xff\xfe"), "{}")
    for args in (["get", "pods"], ["policy", "matrix"], ["ipam", "check"]):
        res = agentctl(etcd_server.endpoint, *args)
        assert "Traceback" not in res.stdout + res.stderr, res.stderr
        if res.returncode != 0:
            assert_one_etcd_line(res, " ".join(args))
