"""The status as operators read it: a reason that spans lines (an exception's message) stays on its row and on the
probe's first line, columns line up, and the JSON form carries every field as it is."""

from __future__ import annotations

import json

from daemon import report
from daemon.supervisor import ComponentStatus, State, Status
from daemon.threads import ThreadDeath


def status() -> Status:
    death = ThreadDeath("policy", "policy-loop", "ValueError: bad\nrule", "Traceback ...", 1.0)
    return Status(
        live=False,
        ready=False,
        components=(
            ComponentStatus("datastore", State.RUNNING, True, True, "in sync at revision 42", 0.04, 30.0, ()),
            ComponentStatus("policy", State.RUNNING, False, False, death.describe(), 12.5, 30.0, (death,)),
        ),
    )


def test_text_rows_stay_on_one_line_and_align() -> None:
    assert report.liveness_text(status()).splitlines() == [
        "not live: policy: thread policy-loop died: ValueError: bad rule",
        "component  state    live  ready  progress    reason",
        "datastore  running  yes   yes    0.0 s ago   in sync at revision 42",
        "policy     running  no    no     12.5 s ago  thread policy-loop died: ValueError: bad rule",
    ]
    assert report.readiness_text(status()).splitlines()[0] == "not ready: policy"


def test_json_carries_every_field() -> None:
    doc = json.loads(report.to_json(status()))
    assert doc["live"] is False and doc["ready"] is False
    assert doc["components"][1] == {
        "name": "policy",
        "state": "running",
        "live": False,
        "ready": False,
        "reason": "thread policy-loop died: ValueError: bad\nrule",
        "progress_age_seconds": 12.5,
        "liveness_timeout_seconds": 30.0,
        "thread_deaths": [{"thread": "policy-loop", "error": "ValueError: bad\nrule"}],
    }
