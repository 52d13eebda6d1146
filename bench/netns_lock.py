"""The machine-wide lock the netns test suite takes: benchmarks hold it too, so no two namespace-heavy runs (or a
run and a test session) share the 2 CPUs and spoil each other's figures."""

from __future__ import annotations

import fcntl
from typing import IO

LOCK = "/run/lock/podnet-netns.lock"


def hold() -> IO[str]:
    """Block until the lock is ours; it is held until the returned file is closed (or the process exits)."""
    fh = open(LOCK, "w")  # noqa: SIM115 - held for the whole run
    fcntl.flock(fh, fcntl.LOCK_EX)
    return fh
