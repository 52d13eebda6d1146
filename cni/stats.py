"""What the CNI server counts, as plain numbers: the daemon's metrics collectors turn them into Prometheus series
(no metrics library here, so the one-shot plugin and ``podnet-cni serve`` stay light).

``CniStats.latency[command]``: a ``Histogram`` of ADD, DEL and CHECK wall times (seconds);
``CniStats.requests()`` and ``CniStats.errors()``: calls and failed calls (exit code not 0) by command, every CNI
command plus ``INVALID`` (a request that could not be read, or no known CNI_COMMAND).
"""

from __future__ import annotations

import bisect
import threading
from typing import NamedTuple

from cni.config import COMMANDS

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # seconds, Prometheus' defaults
TIMED = ("ADD", "DEL", "CHECK")
INVALID = "INVALID"


class HistogramSnapshot(NamedTuple):
    """(bucket bounds, cumulative counts, sum, count), as a Prometheus histogram's series are."""

    bounds: tuple[float, ...]  # upper bounds (le), ascending; +Inf is implied: its cumulative count is ``samples``
    cumulative: tuple[int, ...]  # observations <= each bound
    sum: float  # of every observation
    samples: int  # how many observations (Prometheus' _count: a tuple's ``count`` is taken)


class Histogram:
    """Observations counted into fixed buckets; thread-safe."""

    def __init__(self, bounds: tuple[float, ...] = BUCKETS) -> None:
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # per bucket, the last one above every bound
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.bounds, value)  # the first bound >= value (le is inclusive)
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    def snapshot(self) -> HistogramSnapshot:
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, running = [], 0
        for n in counts[:-1]:
            running += n
            cumulative.append(running)
        return HistogramSnapshot(self.bounds, tuple(cumulative), total, sum(counts))


class CniStats:
    def __init__(self) -> None:
        self.latency = {command: Histogram() for command in TIMED}
        self._lock = threading.Lock()
        self._requests = dict.fromkeys((*COMMANDS, INVALID), 0)
        self._errors = dict.fromkeys((*COMMANDS, INVALID), 0)

    def record(self, command: str, seconds: float, ok: bool) -> None:
        """One call answered; ``command`` as the client sent it (anything unknown counts as INVALID)."""
        key = command if command in self._requests else INVALID
        if key in self.latency:
            self.latency[key].observe(seconds)
        with self._lock:
            self._requests[key] += 1
            if not ok:
                self._errors[key] += 1

    def requests(self) -> dict[str, int]:
        with self._lock:
            return dict(self._requests)

    def errors(self) -> dict[str, int]:
        with self._lock:
            return dict(self._errors)

    def to_json(self) -> dict[str, object]:
        """What ``podnet-cni serve`` answers to a stats request (``cni.wire.STATS_COMMAND``)."""
        latency = {}
        for command, h in self.latency.items():
            snap = h.snapshot()
            latency[command] = {"bounds": list(snap.bounds), "cumulative": list(snap.cumulative), "sum": snap.sum,
                                "samples": snap.samples}  # fmt: skip
        return {"latency": latency, "requests": self.requests(), "errors": self.errors()}


class _Frozen:
    def __init__(self, snap: HistogramSnapshot) -> None:
        self._snap = snap

    def snapshot(self) -> HistogramSnapshot:
        return self._snap


class StatsCopy:
    """A ``CniStats`` as another process reported it (``CniStats.to_json``): the same read API."""

    def __init__(self, data: object) -> None:
        """ValueError: not what ``to_json`` writes."""
        try:
            if not isinstance(data, dict):
                raise TypeError(f"expected an object, found {type(data).__name__}")
            self.latency = {
                str(command): _Frozen(HistogramSnapshot(tuple(float(b) for b in h["bounds"]),
                                                        tuple(int(c) for c in h["cumulative"]),
                                                        float(h["sum"]), int(h["samples"])))
                for command, h in data["latency"].items()
            }  # fmt: skip
            self._requests = {str(k): int(v) for k, v in data["requests"].items()}
            self._errors = {str(k): int(v) for k, v in data["errors"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not CNI server stats: {exc}") from None

    def requests(self) -> dict[str, int]:
        return dict(self._requests)

    def errors(self) -> dict[str, int]:
        return dict(self._errors)
