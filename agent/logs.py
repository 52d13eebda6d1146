"""podnet's log level at run time: the cluster config's ``logLevel`` applies to podnet's own loggers (not to the
libraries', nor to the trace logger), so an operator can turn on debug logs on every node without a restart."""

from __future__ import annotations

import logging

# The top-level packages whose loggers (``logging.getLogger(__name__)``) are podnet's.
PACKAGES = ("daemon", "agent", "bgp", "cni", "controller", "datastore", "ipam", "lab")

log = logging.getLogger(__name__)


def apply_log_level(level: str, source: str) -> None:
    """Set podnet's loggers to ``level`` (debug, info, warning, error). The change is logged under whichever of the
    old and new levels is more verbose, so it is seen either way."""
    new = logging.getLevelName(level.upper())
    if not isinstance(new, int):
        raise ValueError(f"unknown log level {level!r}")
    message = ("podnet log level: %s (from %s)", logging.getLevelName(new), source)
    if new > log.getEffectiveLevel():
        log.info(*message)
    for name in PACKAGES:
        logging.getLogger(name).setLevel(new)
    if new <= log.getEffectiveLevel():
        log.info(*message)
