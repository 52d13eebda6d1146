"""The daemon's metrics registry and the supervisor's own metrics.

Every podnet metric is named ``podnet_…`` with its unit in the name. Process CPU and memory come from
prometheus_client's process collector under the names every Prometheus client library uses
(``process_cpu_seconds_total``, ``process_resident_memory_bytes``, ...), so stock dashboards and alerts find them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from daemon.supervisor import Status


def new_registry() -> CollectorRegistry:
    """An empty registry with the process collector (CPU, memory, file descriptors, start time) on it."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    return registry


class ComponentCollector:
    """Per-component liveness, readiness, progress age and thread deaths, read from the supervisor at scrape time."""

    def __init__(self, status: Callable[[], Status]) -> None:
        self._status = status

    def register(self, registry: CollectorRegistry) -> ComponentCollector:
        registry.register(self)
        return self

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        live, ready, age, timeout, deaths = families = self._families()
        for c in self._status().components:
            live.add_metric([c.name], 1.0 if c.live else 0.0)
            ready.add_metric([c.name], 1.0 if c.ready else 0.0)
            age.add_metric([c.name], c.progress_age)
            timeout.add_metric([c.name], c.timeout)
            deaths.add_metric([c.name], float(len(c.deaths)))
        return families

    @staticmethod
    def _families() -> tuple[
        GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily, CounterMetricFamily
    ]:
        labels = ["component"]
        return (
            GaugeMetricFamily("podnet_component_live", "1 if the component passes liveness, else 0", labels=labels),
            GaugeMetricFamily("podnet_component_ready", "1 if the component is ready, else 0", labels=labels),
            GaugeMetricFamily(
                "podnet_component_progress_age_seconds",
                "Seconds since the component's loop last made progress",
                labels=labels,
            ),
            GaugeMetricFamily(
                "podnet_component_liveness_timeout_seconds",
                "Seconds without progress after which the component counts as wedged",
                labels=labels,
            ),
            CounterMetricFamily(
                "podnet_component_thread_deaths",
                "Threads of the component that raised or ended without being asked to",
                labels=labels,
            ),
        )
