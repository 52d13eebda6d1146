"""The status reporter's retry schedule while etcd fails, and how the cluster's log level reaches podnet's loggers
(and only them)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from agent.logs import PACKAGES, apply_log_level
from agent.status import Backoff


def test_backoff_doubles_to_its_cap_with_jitter() -> None:
    b = Backoff(first=0.5, cap=5.0, jitter=0.2)
    assert [b.delay(n, 0.5) for n in (1, 2, 3, 4, 5, 9)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert b.delay(1, 0.0) == pytest.approx(0.4)
    assert b.delay(9, 0.999999) == pytest.approx(6.0)


@pytest.fixture
def levels() -> Iterator[None]:
    names = [*PACKAGES, "grpc", "podnet.trace"]
    saved = {name: logging.getLogger(name).level for name in names}
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


@pytest.mark.usefixtures("levels")
def test_the_cluster_log_level_applies_to_podnets_loggers_only(caplog: pytest.LogCaptureFixture) -> None:
    logging.getLogger("grpc").setLevel(logging.NOTSET)
    caplog.set_level(logging.INFO)
    apply_log_level("debug", "the cluster config")
    for name in ("agent.router.loop", "bgp.speaker", "datastore.etcd", "ipam.allocator", "cni.server"):
        assert logging.getLogger(name).isEnabledFor(logging.DEBUG), name
    assert not logging.getLogger("grpc._channel").isEnabledFor(logging.DEBUG)  # a library's: untouched
    apply_log_level("warning", "the cluster config")
    assert not logging.getLogger("bgp.speaker").isEnabledFor(logging.INFO)
    # Each change is logged where it can be seen: under the more verbose of the old and new levels.
    said = [r.getMessage() for r in caplog.records if r.name == "agent.logs"]
    assert said == [
        "podnet log level: DEBUG (from the cluster config)",
        "podnet log level: WARNING (from the cluster config)",
    ]
    with pytest.raises(ValueError, match="unknown log level"):
        apply_log_level("chatty", "the cluster config")
