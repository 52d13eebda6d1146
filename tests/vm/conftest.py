"""The VM tier's tests run as root in a guest whose kernel has IPIP (tests/vm/runner.py boots it), where nothing
else runs: no cross-run lock here (taking the netns suite's lock too would deadlock a session that collects both
suites, as the guest's default selection does)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def vm_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the VM-tier tests need root (network namespaces, tunnels, iptables)", pytrace=False)
