"""IPAM garbage collection: release leaked allocations, carefully.

A leak seen once may be an ADD in flight (allocated, endpoint not yet written). So a handle is released only when it
was leaked on every look for at least ``grace`` seconds AND is still leaked on a fresh look right before release,
and the release compares the handle record's revision from that last look (a handle touched meanwhile is kept).
The controller calls ``run_once`` periodically; a test can use ``grace=0``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ipam.allocator import Ipam
from ipam.check import check

log = logging.getLogger(__name__)


@dataclass
class LeakCollector:
    ipam: Ipam
    grace: float = 900.0
    clock: Callable[[], float] = time.monotonic
    first_seen: dict[str, float] = field(default_factory=dict)

    def run_once(self) -> list[str]:
        """One GC round; returns the handles released."""
        now = self.clock()
        leaked = check(self.ipam.client).leaked_handles
        self.first_seen = {h: self.first_seen.get(h, now) for h in leaked}
        due = {h for h, seen in self.first_seen.items() if now - seen >= self.grace}
        if not due:
            return []
        second = check(self.ipam.client)
        released: list[str] = []
        for handle in sorted(due & second.leaked_handles):
            ips = self.ipam.release_handle(handle, expect_revision=second.handle_revisions.get(handle))
            if ips:
                log.info("released leaked handle %s (%s)", handle, ", ".join(ips))
                released.append(handle)
            self.first_seen.pop(handle, None)
        return released
