"""A ``podnet-agent`` process for one node namespace (no tests here): started with the node's options, its health
endpoints on a free loopback port, its log in the test's directory; stopped by SIGTERM or SIGKILL (by PID)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from testbed.etcd_server import free_port
from testbed.netns import kill_namespace_pids
from testbed.procs import register_child, unregister_child

AGENT = str(Path(sys.executable).with_name("podnet-agent"))


class AgentProc:
    def __init__(self, node: str, netns: str, endpoint: str, workdir: Path, *extra: str) -> None:
        self.node = node
        self.netns = netns
        self.endpoint = endpoint
        self.workdir = workdir
        self.extra = extra
        self.port = free_port()
        self.log_path = workdir / f"agent-{node}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def cni_socket(self) -> Path:
        return self.workdir / f"{self.node}-cni.sock"

    def argv(self) -> list[str]:
        return [
            AGENT,
            "--node-name", self.node,
            "--netns", self.netns,
            "--etcd-endpoints", self.endpoint,
            "--workdir", str(self.workdir / self.node),
            "--health-bind", f"127.0.0.1:{self.port}",
            "--cni-socket", str(self.cni_socket),
            *self.extra,
        ]  # fmt: skip

    def start(self, env: dict[str, str] | None = None) -> AgentProc:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child writes it until it exits
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=env)  # fmt: skip
        log.close()
        register_child(self.proc.pid)
        return self

    def get(self, path: str) -> tuple[int, str]:
        """(HTTP status, body) of an endpoint; (0, why) when nothing answers."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=3) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError as exc:
            return 0, str(exc)

    def ready(self) -> bool:
        return self.get("/readiness")[0] == 200

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout: float = 35.0) -> int:
        """SIGTERM; the exit status (fails the test if it takes longer than the grace period)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._reap()

    def kill(self) -> None:
        """SIGKILL, no goodbye: the agent's children (ExaBGP, its bridge) must die with it."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._reap()

    def _reap(self) -> None:
        if self.proc is not None:
            unregister_child(self.proc.pid)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self._reap()
        kill_namespace_pids(self.netns)

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text()[-6000:]
        return ""
