"""The contract every part of the node daemon keeps, so that one supervisor can start, stop and judge them alike.

A component starts its own threads in ``start()`` and returns; it stops them by a monotonic deadline in
``stop(deadline)`` (the supervisor shares the pod's grace period out among the components); and ``health()`` says,
as a cheap read that never waits on the component's loop, whether it is alive, whether it is ready and why, and when
its loop last made progress. A loop that waits for work must still wake up and beat at least once per liveness
timeout: the supervisor cannot tell an idle loop from a wedged one otherwise (kube-router's heartbeats).

``Heartbeat`` is the usual way to keep that state: the loop writes it, ``health()`` returns its snapshot.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Health:
    """One component's own view of itself, at one moment."""

    alive: bool  # False: the component knows it cannot do its job any more (a thread it depends on ended)
    ready: bool  # it does what it is for (in sync, first apply done, ...)
    reason: str  # why not ready or not alive, or what it is doing: shown to operators as is
    last_progress: float  # time.monotonic() when its loop last went round
    timeout: float  # seconds without progress after which it counts as wedged


class Component(Protocol):
    @property
    def name(self) -> str: ...

    def start(self) -> None:
        """Start the component's threads and return; raise if it cannot start at all."""

    def stop(self, deadline: float) -> None:
        """Stop the component's threads, returning by ``deadline`` (time.monotonic()) whatever happens."""

    def health(self) -> Health:
        """The component's health now; must not block (no lock its loop can hold for long, no I/O)."""


class Heartbeat:
    """Health state shared by a component's loop (the writer) and ``health()`` (the reader).

    Every update replaces one immutable ``Health``: a reader takes the reference and never waits for a writer,
    however long the loop holds its own locks.
    """

    def __init__(self, timeout: float, reason: str = "starting") -> None:
        self._lock = threading.Lock()  # writers only: two threads of one component may both report
        self._health = Health(alive=True, ready=False, reason=reason, last_progress=time.monotonic(), timeout=timeout)

    def beat(self, *, ready: bool | None = None, reason: str | None = None) -> None:
        """The loop went round (and, if given, its readiness and reason changed)."""
        with self._lock:
            h = self._health
            self._health = dataclasses.replace(
                h,
                ready=h.ready if ready is None else ready,
                reason=h.reason if reason is None else reason,
                last_progress=time.monotonic(),
            )

    def set(self, *, ready: bool, reason: str) -> None:
        """Readiness changed without the loop going round (progress time kept)."""
        with self._lock:
            self._health = dataclasses.replace(self._health, ready=ready, reason=reason)

    def set_timeout(self, timeout: float) -> None:
        """A phase known to take long (a first full sync) may widen the liveness timeout, then narrow it again."""
        with self._lock:
            self._health = dataclasses.replace(self._health, timeout=timeout, last_progress=time.monotonic())

    def dead(self, reason: str) -> None:
        """The component can no longer do its job."""
        with self._lock:
            self._health = dataclasses.replace(self._health, alive=False, ready=False, reason=reason)

    def snapshot(self) -> Health:
        return self._health
