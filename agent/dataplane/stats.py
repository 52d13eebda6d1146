"""Plain, thread-safe statistics the writers keep for the daemon's metrics (which read them at scrape time).

No metrics library here: the layers below ``daemon/`` only count and time; ``daemon/metrics_node.py`` turns these
into Prometheus families. Recording costs a lock and a few additions.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass

# Upper bounds in seconds: a change's write is milliseconds, a first full sync of a large node seconds.
DURATION_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class HistogramSnapshot:
    bounds: tuple[float, ...]  # upper bounds, ascending, without +Inf
    cumulative: tuple[int, ...]  # observations <= each bound, then the total (+Inf): len(bounds) + 1
    sum: float
    count: int


class Histogram:
    """Observations counted into fixed buckets (what a Prometheus histogram exposes)."""

    def __init__(self, bounds: tuple[float, ...] = DURATION_BUCKETS) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError(f"bucket bounds must be ascending and distinct: {bounds}")
        self.bounds = bounds
        self._lock = threading.Lock()
        self._counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last one is over every bound
        self._sum = 0.0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.bounds, value)  # a value equal to a bound belongs to that bound's bucket (le)
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    def snapshot(self) -> HistogramSnapshot:
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative: list[int] = []
        running = 0
        for c in counts:
            running += c
            cumulative.append(running)
        return HistogramSnapshot(self.bounds, tuple(cumulative), total, running)


class Counters:
    """Counts by name (e.g. by tool), thread-safe; ``snapshot`` is a copy."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)
