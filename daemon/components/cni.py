"""The CNI component: the node-local CNI server (``podnet-cni serve``) as a supervised child process of the agent.

A child, not a thread, by measurement (bench/results/agent_footprint.md): in the agent's process every CNI ADD
waits for the interpreter lock behind the policy compiler and the route loop, and under a verify pass its p99 was
~1 s against ~0.17 s in a process of its own. The child is started from this component's monitor thread through
``bgp.launch`` (``PR_SET_PDEATHSIG``: it dies with that thread, so with the agent, even on SIGKILL); a child that
exits unasked is started again with a backoff (1 s doubling to 30 s) and counted. Its call counts and latencies
reach the agent's /metrics through a stats request on its socket (``cni.wire.STATS_COMMAND``).

Ready while the child runs and listens; stopping sends it SIGTERM (pods already wired keep working; the kubelet
retries a CNI call that failed meanwhile) and SIGKILL at the deadline.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from cni.stats import StatsCopy
from cni.wire import STATS_COMMAND, encode_request, parse_answer
from daemon.component import Health, Heartbeat
from daemon.threads import Threads
from datastore.etcd import EtcdTLS

log = logging.getLogger(__name__)
LOOP_TIMEOUT = 30.0
START_TIMEOUT = 30.0
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 30.0


class CniComponent:
    name = "cni"

    def __init__(
        self,
        socket_path: Path,
        threads: Threads,
        *,
        tls: EtcdTLS | None = None,
        etcd_timeout: float = 10.0,
        log_level: str = "info",
    ) -> None:
        self.socket = socket_path
        self.threads = threads
        self.tls = tls
        self.etcd_timeout = etcd_timeout
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._heartbeat = Heartbeat(LOOP_TIMEOUT, reason="not started")
        self._thread: threading.Thread | None = None

    def argv(self) -> list[str]:
        # The child is forked by the monitor thread; bgp.launch arms PR_SET_PDEATHSIG and execs the server.
        args = [sys.executable, "-m", "bgp.launch", str(os.getpid()), sys.executable, "-m", "cni.serve",
                "--cni-socket", str(self.socket), "--etcd-timeout", f"{self.etcd_timeout}s",
                "--log-level", self.log_level]  # fmt: skip
        if self.tls is not None:
            for flag, path in (("--etcd-ca-file", self.tls.ca_file), ("--etcd-cert-file", self.tls.cert_file),
                               ("--etcd-key-file", self.tls.key_file)):  # fmt: skip
                if path is not None:
                    args += [flag, str(path)]
        return args

    def start(self) -> None:
        self._heartbeat.beat(ready=False, reason="starting podnet-cni serve")
        self._thread = self.threads.spawn(self.name, "cni-child", self._monitor)
        if not self._listening.wait(START_TIMEOUT):
            raise RuntimeError(f"podnet-cni serve did not listen on {self.socket} within {START_TIMEOUT:.0f} s")

    def _spawn(self) -> subprocess.Popen[bytes] | None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PODNET_")}  # the agent's options are ours
        proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env)
        assert proc.stdout is not None
        line = proc.stdout.readline().decode(errors="replace").strip()  # "ready <socket>", or EOF if it failed
        if not line.startswith("ready"):
            proc.wait()
            return None
        self.proc = proc
        log.info("podnet-cni serve (pid %d) listening on %s", proc.pid, self.socket)
        return proc

    def _monitor(self) -> None:
        delay = BACKOFF_FIRST
        while not self._stop.is_set():
            proc = self._spawn()
            if proc is None:
                why = f"podnet-cni serve failed to start; again in {delay:.0f} s"
            else:
                self._listening.set()
                started = time.monotonic()
                self._heartbeat.beat(ready=True, reason=f"podnet-cni serve (pid {proc.pid}) on {self.socket}")
                while proc.poll() is None and not self._stop.is_set():
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=1.0)
                    self._heartbeat.beat()
                if self._stop.is_set():
                    return
                if time.monotonic() - started > 60:
                    delay = BACKOFF_FIRST  # it ran a while: a fresh failure, not a crash loop
                why = f"podnet-cni serve exited with status {proc.returncode}; again in {delay:.0f} s"
            self.restarts += 1
            log.error("%s", why)
            self._heartbeat.beat(ready=False, reason=why)
            if self._stop.wait(delay):
                return
            delay = min(BACKOFF_MAX, delay * 2)

    def stats(self) -> StatsCopy | None:
        """The child's call counts and latencies (None while it does not answer)."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(2.0)
                conn.connect(str(self.socket))
                conn.sendall(encode_request({"CNI_COMMAND": STATS_COMMAND}))
                conn.shutdown(socket.SHUT_WR)
                raw = b""
                while chunk := conn.recv(65536):
                    raw += chunk
            answer = parse_answer(raw)
            if answer is None or answer[0] != 0:
                return None
            return StatsCopy(json.loads(answer[1]))
        except (OSError, ValueError):
            return None

    def stop(self, deadline: float) -> None:
        self.threads.stopping(self.name)
        self._stop.set()
        self._heartbeat.set(ready=False, reason="stopped")
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic() - 0.5))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))

    def health(self) -> Health:
        return self._heartbeat.snapshot()
