"""The VM tier's tests run as root in a guest whose kernel has IPIP (tests/vm/runner.py boots it). On a host whose
kernel already has IPIP they run there too, one suite at a time like the netns suite (same lock)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator

import pytest

LOCK = "/run/lock/podnet-netns.lock"


@pytest.fixture(scope="session", autouse=True)
def vm_exclusive() -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.fail("the VM-tier tests need root (network namespaces, tunnels, iptables)", pytrace=False)
    os.makedirs(os.path.dirname(LOCK), exist_ok=True)
    with open(LOCK, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield
