"""Components run their loops through ``Threads.spawn`` so that a loop that dies is never silent.

A thread that raises, or returns while nobody asked its component to stop, is recorded as a ``ThreadDeath`` (with
the exception) and handed to the supervisor, which fails liveness naming the component (and may exit the process).
A thread that ends while its component is stopping ended as asked; an exception then is logged, not a death.
"""

from __future__ import annotations

import logging
import socketserver
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThreadDeath:
    component: str
    thread: str
    error: str  # "ValueError: boom", or "returned" for a loop that ended without being asked to
    traceback: str  # empty when it returned
    when: float  # time.monotonic()

    def describe(self) -> str:
        return f"thread {self.thread} died: {self.error}"


class Threads:
    """The daemon's registry of supervised threads (one per daemon; the supervisor owns it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: dict[str, list[threading.Thread]] = {}
        self._deaths: dict[str, list[ThreadDeath]] = {}
        self._stopping: set[str] = set()
        self._listeners: list[Callable[[ThreadDeath], None]] = []

    def spawn(
        self, component: str, name: str, target: Callable[[], None], *, expect_return: bool = False
    ) -> threading.Thread:
        """Start ``target`` on a daemon thread of ``component``. ``expect_return``: a one-shot job, whose normal
        return is no death (an exception still is)."""
        thread = threading.Thread(
            target=self._run, args=(component, name, target, expect_return), name=name, daemon=True
        )
        with self._lock:
            # Ended threads are forgotten here, so that a component spawning one-shot jobs does not grow the list.
            alive = [t for t in self._threads.get(component, ()) if t.is_alive()]
            self._threads[component] = [*alive, thread]
        thread.start()
        return thread

    def _run(self, component: str, name: str, target: Callable[[], None], expect_return: bool) -> None:
        try:
            target()
        except BaseException as e:  # a dying loop must be reported whatever killed it
            self._ended(component, name, f"{type(e).__name__}: {e}", traceback.format_exc())
        else:
            if not expect_return:
                self._ended(component, name, "returned", "")

    def _ended(self, component: str, name: str, error: str, tb: str) -> None:
        with self._lock:
            stopping = component in self._stopping
            death = ThreadDeath(component, name, error, tb, time.monotonic())
            if not stopping:
                self._deaths.setdefault(component, []).append(death)
            listeners = list(self._listeners)
        if stopping:
            if tb:
                log.warning("component %s: thread %s raised while stopping: %s", component, name, error)
            return
        log.error("component %s: %s%s", component, death.describe(), f"\n{tb}" if tb else "")
        for listener in listeners:
            listener(death)

    def on_death(self, listener: Callable[[ThreadDeath], None]) -> None:
        """Called (from the dying thread) for every death."""
        with self._lock:
            self._listeners.append(listener)

    def stopping(self, component: str) -> None:
        """From now on threads of ``component`` that end do so because they were asked to."""
        with self._lock:
            self._stopping.add(component)

    def deaths(self, component: str) -> list[ThreadDeath]:
        with self._lock:
            return list(self._deaths.get(component, ()))

    def running(self, component: str) -> list[str]:
        """Names of ``component``'s threads still running."""
        with self._lock:
            return [t.name for t in self._threads.get(component, ()) if t.is_alive()]


def stop_server(server: socketserver.BaseServer, thread: threading.Thread | None, deadline: float) -> None:
    """End a ``serve_forever`` loop running on ``thread`` and close the server, by ``deadline``. ``shutdown()`` waits
    for the loop, which looks every poll interval: within the deadline unless the loop is wedged (the supervisor then
    reports the stop as overrunning)."""
    if thread is not None and thread.is_alive():
        server.shutdown()
        thread.join(max(0.0, deadline - time.monotonic()))
    server.server_close()
