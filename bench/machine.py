"""One line saying what machine a figure was measured on: shared 2-CPU machines make a figure meaningless without
its CPU count, load and kernel."""

from __future__ import annotations

import os
import platform


def describe(load_before: float | None = None) -> str:
    """``N CPUs, kernel K, 1-min load average X before and Y now``."""
    now = os.getloadavg()[0]
    load = f"{load_before:.1f} before and {now:.1f} after" if load_before is not None else f"{now:.1f}"
    return f"{os.cpu_count()} CPUs, kernel {platform.release()}, 1-min load average {load}"
