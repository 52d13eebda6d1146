"""A daemon component for tests: a real loop on a supervised thread that beats a Heartbeat, which a test can make
raise, return, wedge (stop beating) or refuse to stop."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from daemon.component import Health, Heartbeat
from daemon.threads import Threads


@dataclass
class Journal:
    """What the components were asked to do, in order, shared by all of one test's components."""

    events: list[tuple[str, str]] = field(default_factory=list)  # (verb, component name)
    deadlines: dict[str, float] = field(default_factory=dict)  # the deadline each stop() was given
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, verb: str, name: str) -> None:
        with self.lock:
            self.events.append((verb, name))

    def of(self, verb: str) -> list[str]:
        with self.lock:
            return [n for v, n in self.events if v == verb]


class LoopComponent:
    def __init__(
        self,
        name: str,
        threads: Threads,
        journal: Journal,
        *,
        timeout: float = 5.0,
        ready_reason: str = "in sync",
        hang_on_stop: bool = False,
        fail_start: bool = False,
    ) -> None:
        self._name = name
        self.threads = threads
        self.journal = journal
        self.heartbeat = Heartbeat(timeout)
        self.ready = True
        self.reason = ready_reason
        self.hang_on_stop = hang_on_stop
        self.fail_start = fail_start
        self.crash = threading.Event()  # the loop raises RuntimeError("boom in <name>")
        self.quit = threading.Event()  # the loop returns as if its work were done
        self.wedge = threading.Event()  # the loop stops beating until it is cleared
        self.unblock = threading.Event()  # lets a hanging stop() return (test teardown)
        self._stop = threading.Event()
        self.thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        return self._name

    def start(self) -> None:
        self.journal.add("start", self._name)
        if self.fail_start:
            raise RuntimeError(f"{self._name} cannot start")
        self.thread = self.threads.spawn(self._name, f"{self._name}-loop", self._loop)

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self.crash.is_set():
                raise RuntimeError(f"boom in {self._name}")
            if self.quit.is_set():
                return
            if not self.wedge.is_set():
                self.heartbeat.beat(ready=self.ready, reason=self.reason)
            self._stop.wait(0.01)

    def stop(self, deadline: float) -> None:
        self.journal.add("stop", self._name)
        with self.journal.lock:
            self.journal.deadlines[self._name] = deadline
        if self.hang_on_stop:
            self.unblock.wait(60)  # ignores its deadline, as a buggy component would
        self._stop.set()
        if self.thread is not None:
            self.thread.join(max(0.0, deadline - time.monotonic()))
        self.journal.add("stopped", self._name)

    def health(self) -> Health:
        return self.heartbeat.snapshot()

    def report(self, ready: bool, reason: str) -> None:
        """From now on the loop reports this readiness and reason."""
        self.ready, self.reason = ready, reason
        self.heartbeat.set(ready=ready, reason=reason)


def wait_for(predicate: object, timeout: float = 5.0) -> None:
    assert callable(predicate)
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {predicate}")
        time.sleep(0.01)
