"""``podnet-agent`` as a process and in-process, without network namespaces (every dataplane mode off: nothing of
the machine is touched): bad configuration refused naming its source, ``config -o json`` with sources, a datastore
that cannot be read within ``--cache-sync-timeout`` ends the start saying why, a dead component thread fails
liveness naming it, SIGHUP reloads the log level from the file, SIGTERM stops it cleanly and its status goes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from daemon import config_cli
from daemon.node import NodeAgent, etcd_client
from datastore import keys as k
from datastore import model as m
from datastore.etcd import EtcdClient
from datastore.store import Store
from testbed.etcd_server import EtcdServer, free_port
from testbed.wait import eventually

pytestmark = pytest.mark.integration
AGENT = str(Path(sys.executable).with_name("podnet-agent"))
OFF = ("--no-run-router", "--no-run-firewall", "--no-run-cni")
ENV = {k_: v for k_, v in os.environ.items() if not k_.startswith("PODNET_")}


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def test_bad_configuration_is_refused_naming_its_source(tmp_path: Path) -> None:
    bad_flag = subprocess.run([AGENT, "--node-name", "a", "--sync-period", "soon"], capture_output=True, text=True,
                              timeout=60, check=False, env=ENV)  # fmt: skip
    assert bad_flag.returncode == 2
    assert bad_flag.stderr.strip().startswith("podnet-agent: flag --sync-period:"), bad_flag.stderr
    conf = tmp_path / "agent.yaml"
    conf.write_text("syncPeriod: 1m\nlogLevl: debug\n")
    bad_file = subprocess.run([AGENT, "--config", str(conf)], capture_output=True, text=True, timeout=60,
                              check=False, env=ENV)  # fmt: skip
    assert bad_file.returncode == 2
    assert f"config file {conf}: unknown key 'logLevl' (did you mean 'logLevel'?)" in bad_file.stderr
    bad_env = subprocess.run([AGENT, "--node-name", "a"], capture_output=True, text=True, timeout=60, check=False,
                             env={**ENV, "PODNET_SYNC_PERIDO": "1m"})  # fmt: skip
    assert bad_env.returncode == 2 and "environment PODNET_SYNC_PERIDO" in bad_env.stderr, bad_env.stderr


def test_config_prints_each_value_with_its_source(tmp_path: Path) -> None:
    conf = tmp_path / "agent.yaml"
    conf.write_text("syncPeriod: 2m\nlogLevel: warning\n")
    out = subprocess.run([AGENT, "config", "--config", str(conf), "--log-level", "debug", "-o", "json"],
                         capture_output=True, text=True, timeout=60, check=True,
                         env={**ENV, "NODE_NAME": "node-7", "PODNET_RUN_CNI": "false"})  # fmt: skip
    got = json.loads(out.stdout)
    assert got["logLevel"] == {"value": "debug", "source": "flag --log-level"}
    assert got["syncPeriod"] == {"value": 120.0, "source": f"config file {conf}"}
    assert got["nodeName"] == {"value": "node-7", "source": "environment NODE_NAME"}
    assert got["runCNI"] == {"value": False, "source": "environment PODNET_RUN_CNI"}
    assert got["runRouter"]["source"] == "default"


def test_an_unreadable_datastore_ends_the_start_saying_why(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    proc = subprocess.run(
        [AGENT, "--node-name", "a", "--etcd-endpoints", dead, "--cache-sync-timeout", "3s", "--health-bind",
         f"127.0.0.1:{free_port()}", "--workdir", str(tmp_path), *OFF],
        capture_output=True, text=True, timeout=90, check=False, env=ENV,
    )  # fmt: skip
    took = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr
    assert f"cannot read the datastore at {dead} within 3 s" in proc.stderr, proc.stderr
    assert took < 30, f"gave up after {took:.0f} s"


def test_a_dead_component_thread_fails_liveness_naming_it(etcd: EtcdClient, etcd_server: EtcdServer) -> None:
    parser = config_cli.build_parser()
    args = parser.parse_args(["--node-name", "live-a", "--etcd-endpoints", etcd_server.endpoint,
                              "--health-bind", "127.0.0.1:0", *OFF])  # fmt: skip
    config = config_cli.load(args, env={}).config
    client = etcd_client(config)
    agent = NodeAgent(config, client, exit_on_death=False)
    try:
        agent.start()
        port = agent.http.port
        assert eventually(lambda: _get(port, "/readiness")[0] == 200, timeout=20), _get(port, "/readiness")
        assert _get(port, "/healthz")[0] == 200

        class Boom(BaseException):
            pass

        def boom(now: float | None = None) -> bool:
            raise Boom("wedged on purpose")

        agent.status.publish_once = boom  # type: ignore[method-assign]  # its loop's next round raises
        assert eventually(lambda: _get(port, "/healthz")[0] == 503, timeout=10)
        _, body = _get(port, "/healthz")
        assert body.splitlines()[0].startswith("not live: status: thread status died: Boom: wedged on purpose"), body
        assert _get(port, "/readiness")[0] == 503
    finally:
        agent.stop()
        client.close()


def test_sighup_reloads_the_log_level_and_sigterm_removes_the_status(
    etcd: EtcdClient, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    conf = tmp_path / "agent.yaml"
    conf.write_text("logLevel: info\n")
    port = free_port()
    log_path = tmp_path / "agent.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [AGENT, "--node-name", "hup-a", "--etcd-endpoints", etcd_server.endpoint, "--config", str(conf),
             "--health-bind", f"127.0.0.1:{port}", "--workdir", str(tmp_path), *OFF],
            stdout=log, stderr=subprocess.STDOUT, env=ENV,
        )  # fmt: skip
    try:
        assert eventually(lambda: _get(port, "/readiness")[0] == 200, timeout=30), log_path.read_text()
        store = Store(etcd)

        def published() -> m.AgentStatus | None:
            got = store.get(k.AgentStatusKey("hup-a"), m.AgentStatus)
            return None if got is None else got.value

        assert eventually(lambda: (s := published()) is not None and bool(s.ready), timeout=10), published()
        status = published()
        assert status is not None and status.in_sync and status.modes == () and status.not_ready == ()
        conf.write_text("logLevel: debug\nsyncPeriod: 1m\nbgpHoldTime: 30s\n")
        proc.send_signal(signal.SIGHUP)
        text = log_path.read_text
        assert eventually(lambda: "podnet log level: DEBUG (from config file" in text(), timeout=10), text()
        assert "sync period now 60 s" in text()
        assert "SIGHUP: bgpHoldTime changed; that takes a restart of the agent (kept as is)" in text()
        conf.write_text("logLevel: [\n")
        proc.send_signal(signal.SIGHUP)
        assert eventually(lambda: "configuration not reloaded, keeping the running one" in text(), timeout=10)
        assert _get(port, "/readiness")[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=35) == 0
        assert published() is None, "the status outlived the agent"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_an_etcd_outage_is_logged_once_when_it_starts_and_once_when_it_ends(
    etcd: EtcdClient, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    port = free_port()
    log_path = tmp_path / "agent.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [AGENT, "--node-name", "out-a", "--etcd-endpoints", etcd_server.endpoint, "--health-bind",
             f"127.0.0.1:{port}", "--workdir", str(tmp_path), *OFF],
            stdout=log, stderr=subprocess.STDOUT, env=ENV,
        )  # fmt: skip
    assert etcd_server.proc is not None
    etcd_pid = etcd_server.proc.pid
    try:
        assert eventually(lambda: _get(port, "/readiness")[0] == 200, timeout=30), log_path.read_text()
        os.kill(etcd_pid, signal.SIGSTOP)  # etcd hangs: every watch goes silent, every request times out
        try:
            assert eventually(lambda: "datastore unreachable" in log_path.read_text(), timeout=30)
            time.sleep(12)  # long enough for every watch to give up and retry more than once
            code, body = _get(port, "/readiness")
            assert code == 200 and "etcd unreachable for" in body, body  # the dataplane is as good as before
        finally:
            os.kill(etcd_pid, signal.SIGCONT)
        assert eventually(lambda: "datastore reachable again" in log_path.read_text(), timeout=30)
        text = log_path.read_text()
        assert text.count("datastore unreachable") == 1, text
        assert text.count("datastore reachable again") == 1, text
        assert " datastore.watcher " not in text, text  # each watch's retries are at debug level
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=35)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_revision_only_status_changes_are_coalesced_but_never_lost(
    etcd: EtcdClient, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    """Every change anywhere moves each agent's revisions: written at once after a quiet spell (a tool waiting for
    its change sees it), then at most one write per node per 5 s during a burst, and the last one always."""
    port = free_port()
    proc = subprocess.Popen(
        [AGENT, "--node-name", "rev-a", "--etcd-endpoints", etcd_server.endpoint, "--health-bind",
         f"127.0.0.1:{port}", "--workdir", str(tmp_path), *OFF],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    store = Store(etcd)
    key = k.AgentStatusKey("rev-a")

    def record() -> tuple[int, int]:  # (the record's revision field, how often the key was written)
        got = etcd.get(key.path)
        status = store.get(key, m.AgentStatus)
        return (0, 0) if got is None or status is None else (status.value.revision, got.version)

    try:
        assert eventually(lambda: _get(port, "/readiness")[0] == 200, timeout=30)
        time.sleep(6)  # quiet
        _, writes_before = record()
        first = store.put(m.Namespace("burst-0", {}))
        assert eventually(lambda: record()[0] >= first, timeout=3), "the first change after a quiet spell waited"
        last = first
        for i in range(1, 30):
            last = store.put(m.Namespace(f"burst-{i}", {}))
            time.sleep(0.1)
        _, writes = record()
        assert writes - writes_before <= 2, f"{writes - writes_before} status writes for a 3 s burst"
        assert eventually(lambda: record()[0] == last, timeout=10), f"the last revision never published: {record()}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=35)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
