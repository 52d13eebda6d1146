"""The netns suite needs root and must never run twice at once on a machine (shared kernel objects, CPU)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator

import pytest

LOCK = "/run/lock/podnet-netns.lock"


@pytest.fixture(scope="session", autouse=True)
def netns_exclusive() -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.fail("the netns suite needs root (network namespaces, veths, iptables)", pytrace=False)
    os.makedirs(os.path.dirname(LOCK), exist_ok=True)
    with open(LOCK, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # waits for another netns suite on this machine to finish
        yield
