"""The CNI component: the node-local CNI server (``cni.server.CniServer``) on a supervised thread of the agent.
A thread rather than a child process: it shares nothing with the other components but the process (its own etcd
clients, IPAM caches and locks), and the bench (bench/agent_footprint.py) measures the ADD latency it gives under
the agent's own load. Ready once the socket listens; stopping closes the socket (pods already wired keep working;
the kubelet retries a CNI call that failed meanwhile)."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

from cni.server import CniServer
from daemon.component import Health, Heartbeat
from daemon.threads import Threads, stop_server

POLL = 0.5
LOOP_TIMEOUT = 30.0


class CniComponent:
    name = "cni"

    def __init__(self, socket: Path, threads: Threads) -> None:
        self.socket = socket
        self.threads = threads
        self.server: CniServer | None = None
        self._thread: threading.Thread | None = None
        self._heartbeat = Heartbeat(LOOP_TIMEOUT, reason="not listening yet")

    def start(self) -> None:
        server = self.server = CniServer(str(self.socket))
        self._heartbeat.beat(ready=True, reason=f"listening on {self.socket}")
        self._thread = self.threads.spawn(self.name, "cni-serve", lambda: server.serve_forever(POLL))

    def stop(self, deadline: float) -> None:
        server, thread = self.server, self._thread
        if server is None:
            return
        self.threads.stopping(self.name)
        self._heartbeat.set(ready=False, reason="stopped")
        stop_server(server, thread, deadline)

    def health(self) -> Health:
        h = self._heartbeat.snapshot()
        server = self.server
        # The server's loop marks every poll and request: that is this component's progress.
        return h if server is None else dataclasses.replace(h, last_progress=server.last_progress)
