"""Polling helper for tests that wait on an asynchronous effect (a watch event, a kernel route, a BGP session)."""

from __future__ import annotations

import time
from collections.abc import Callable


def eventually(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> bool:
    """True as soon as ``predicate()`` is true; False if it stays false for ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
