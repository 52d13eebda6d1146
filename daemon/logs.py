"""The agent's log lines: one line per event, as text or JSON (``--log-format``), with the node's name.

Text: ``2026-12-03T20:01:02.123Z INFO  agent.router.loop node-1: routes: 2 written``. JSON: one object per line
with ``time``, ``level``, ``logger``, ``node``, ``thread``, ``msg`` (and ``exc`` for a traceback), so that log
shippers need no parsing rules.
"""

from __future__ import annotations

import json
import logging
import time


class _UTCFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{base}.{int(record.msecs):03d}Z"


class TextFormatter(_UTCFormatter):
    def __init__(self, node: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)-5s %(name)s {node}: %(message)s")


class JsonFormatter(_UTCFormatter):
    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "node": self.node,
            "thread": record.threadName,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure(node: str, fmt: str, level: str) -> None:
    """Replace the root handlers with one on stderr in ``fmt`` (text or json); libraries log warnings and up."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(node) if fmt == "json" else TextFormatter(node))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    from agent.logs import PACKAGES

    for name in PACKAGES:
        logging.getLogger(name).setLevel(level.upper())
