"""Continuous UDP probes between pods (no tests here): ``stream`` sends a numbered datagram every 10 ms, each from a
new socket (a new flow, so each one meets the policy); ``Arrivals`` records every datagram a pod receives, with its
source, sequence number and arrival time (``testbed.probe count``)."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator

from testbed.netns import Pod

UDP_PORT = 7070


class Arrivals:
    def __init__(self, pod: Pod, port: int = UDP_PORT) -> None:
        self.proc = pod.ns.popen(sys.executable, "-m", "testbed.probe", "count", str(port))
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"
        self.seen: list[tuple[float, str, int]] = []  # (time.monotonic(), source address, sequence number)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            src, _, seq = line.strip().partition(" ")
            with contextlib.suppress(ValueError):
                self.seen.append((time.monotonic(), src, int(seq)))

    @property
    def times(self) -> list[float]:
        return [t for t, _, _ in list(self.seen)]

    def since(self, t: float) -> int:
        """Datagrams received at or after ``t`` (time.monotonic()), from anyone."""
        return sum(1 for x in self.times if x >= t)

    def from_(self, src: str, since: float = 0.0) -> list[int]:
        """Sequence numbers received from ``src`` at or after ``since``."""
        return [seq for t, s, seq in list(self.seen) if s == src and t >= since]


@contextlib.contextmanager
def stream(src: Pod, dst: Pod, port: int = UDP_PORT) -> Iterator[None]:
    proc = src.ns.popen(sys.executable, "-m", "testbed.probe", "stream", dst.ip, str(port), "0.01")
    try:
        yield
    finally:
        src.ns.bed.stop_process(proc)
