"""The supervisor's status as operators read it: a text table (probes, curl) or JSON (tools). Pure formatting."""

from __future__ import annotations

import json
from typing import Any

from daemon.supervisor import ComponentStatus, Status


def liveness_text(status: Status) -> str:
    failing = "; ".join(f"{c.name}: {_one_line(c.reason)}" for c in status.not_live())
    head = "live" if status.live else f"not live: {failing}"
    return head + "\n" + table(status)


def readiness_text(status: Status) -> str:
    head = "ready" if status.ready else "not ready: " + ", ".join(c.name for c in status.not_ready())
    return head + "\n" + table(status)


def table(status: Status) -> str:
    header = ("component", "state", "live", "ready", "progress", "reason")
    rows = [header] + [
        (
            c.name,
            c.state.value,
            _yes(c.live),
            _yes(c.ready),
            f"{c.progress_age:.1f} s ago",
            _one_line(c.reason),
        )
        for c in status.components
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    return "".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] + "\n" for r in rows
    )


def to_json(status: Status) -> str:
    doc: dict[str, Any] = {
        "live": status.live,
        "ready": status.ready,
        "components": [_component(c) for c in status.components],
    }
    return json.dumps(doc, indent=2) + "\n"


def _component(c: ComponentStatus) -> dict[str, Any]:
    return {
        "name": c.name,
        "state": c.state.value,
        "live": c.live,
        "ready": c.ready,
        "reason": c.reason,
        "progress_age_seconds": round(c.progress_age, 3),
        "liveness_timeout_seconds": c.timeout,
        "thread_deaths": [{"thread": d.thread, "error": d.error} for d in c.deaths],
    }


def _yes(b: bool) -> str:
    return "yes" if b else "no"


def _one_line(s: str) -> str:
    # A reason with a newline (an exception's message) would break the table for whoever greps it.
    return " ".join(s.split())
