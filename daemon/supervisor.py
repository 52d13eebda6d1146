"""Starts the daemon's components in order, stops them in reverse within one deadline, and judges their health.

Rules (docs/daemon.md says them for operators):
- start: in the given order; if one raises, those already started are stopped (in reverse) and ``StartError`` names it.
- stop: in reverse order, within one overall deadline (default: the pod's grace period, 30 s). Each component is given
  an equal share of the time left when its turn comes, so what one does not use goes to the next; a ``stop()`` that
  has not returned by its share is reported and left behind (its thread is a daemon), never waited on longer.
- no restarts in the process: a component whose thread died is in an unknown state, so it is reported (liveness
  fails, naming it) and, if ``exit_on_death``, the supervisor stops everything and exits with status 70; the
  kubelet (or the DaemonSet) starts a fresh process, which adopts what the dataplane holds.
- liveness: every started component alive, with no dead thread, and its loop progressed within its own timeout.
  A component still starting counts as live unless a thread of it died (its start has its own timeout).
- readiness: live, running, and every component says ready.
"""

from __future__ import annotations

import enum
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from daemon.component import Component, Health
from daemon.threads import ThreadDeath, Threads

log = logging.getLogger(__name__)

DEFAULT_GRACE = 30.0  # seconds: Kubernetes' default terminationGracePeriodSeconds
EXIT_THREAD_DIED = 70  # EX_SOFTWARE: the process exits with this when a component thread died and exit_on_death


class State(enum.Enum):
    NEW = "not started"
    STARTING = "starting"
    RUNNING = "running"
    FAILED = "failed to start"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    state: State
    live: bool
    ready: bool
    reason: str
    progress_age: float  # seconds since the component's loop last made progress
    timeout: float  # its liveness timeout
    deaths: tuple[ThreadDeath, ...]


@dataclass(frozen=True)
class Status:
    live: bool
    ready: bool
    components: tuple[ComponentStatus, ...]

    def not_live(self) -> list[ComponentStatus]:
        return [c for c in self.components if not c.live]

    def not_ready(self) -> list[ComponentStatus]:
        return [c for c in self.components if not c.ready]


@dataclass(frozen=True)
class StopResult:
    name: str
    outcome: str  # "stopped", "overran" (stop() had not returned by its share of the deadline) or "raised"
    seconds: float
    detail: str  # the exception, for "raised"
    threads_left: tuple[str, ...]  # the component's supervised threads still running after its stop


class StartError(Exception):
    def __init__(self, name: str, cause: BaseException) -> None:
        super().__init__(f"component {name} failed to start: {type(cause).__name__}: {cause}")
        self.name = name


class Supervisor:
    def __init__(
        self,
        components: Sequence[Component],
        threads: Threads,
        *,
        grace: float = DEFAULT_GRACE,
        exit_on_death: bool = False,
        exit: Callable[[int], None] = os._exit,
    ) -> None:
        self.components: list[Component] = []
        self.threads = threads
        self.grace = grace
        self.exit_on_death = exit_on_death
        self._exit = exit
        self._lock = threading.Lock()
        self._state: dict[str, State] = {}
        self._start_error: dict[str, str] = {}
        self._stop_lock = threading.Lock()  # one stop at a time; a second stop() returns the first one's results
        self._stopped: list[StopResult] | None = None
        self._exiting = False
        threads.on_death(self._died)
        self.add(*components)

    def add(self, *components: Component) -> None:
        """Append components (before start): the endpoints need the supervisor's ``status`` before they are one."""
        with self._lock:
            if any(state is not State.NEW for state in self._state.values()):
                raise RuntimeError("components are added before the supervisor starts")
            names = [c.name for c in self.components] + [c.name for c in components]
            if len(set(names)) != len(names):
                raise ValueError(f"component names must be unique: {names}")
            self.components.extend(components)
            self._state.update((c.name, State.NEW) for c in components)

    # -- lifecycle ------------------------------------------------------------------------------------------------

    def start(self) -> None:
        for c in self.components:
            with self._lock:
                if self._stopped is not None or self._state[c.name] is not State.NEW:
                    return  # stop() was called meanwhile (SIGTERM during start)
                self._state[c.name] = State.STARTING
            log.info("starting %s", c.name)
            try:
                c.start()
            except Exception as e:
                with self._lock:
                    self._state[c.name] = State.FAILED
                    self._start_error[c.name] = f"{type(e).__name__}: {e}"
                log.error("component %s failed to start: %s", c.name, self._start_error[c.name])
                self.stop()
                raise StartError(c.name, e) from e
            with self._lock:
                if self._state[c.name] is State.STARTING:
                    self._state[c.name] = State.RUNNING

    def stop(self, deadline: float | None = None) -> list[StopResult]:
        """Stop every started component in reverse order by ``deadline`` (default: now + grace); returns one result
        per component it stopped, in the order they were stopped."""
        if deadline is None:
            deadline = time.monotonic() + self.grace
        with self._stop_lock:
            if self._stopped is not None:
                return self._stopped
            with self._lock:
                # A component whose start() raised is stopped too: it may have started threads before it failed.
                active = (State.STARTING, State.RUNNING, State.FAILED)
                todo = [c for c in reversed(self.components) if self._state[c.name] in active]
                self._stopped = []
            results: list[StopResult] = []
            for i, c in enumerate(todo):
                share = time.monotonic() + max(0.0, deadline - time.monotonic()) / (len(todo) - i)
                results.append(self._stop_one(c, share))
            with self._lock:
                self._stopped = results
            return results

    def _stop_one(self, c: Component, deadline: float) -> StopResult:
        with self._lock:
            self._state[c.name] = State.STOPPING
        self.threads.stopping(c.name)
        t0 = time.monotonic()
        error: list[BaseException] = []

        def run() -> None:
            try:
                c.stop(deadline)
            except BaseException as e:  # reported in the result; the other components are stopped all the same
                error.append(e)

        # stop() runs on a thread of its own so that one that hangs cannot hold the others past the deadline.
        stopper = threading.Thread(target=run, name=f"stop:{c.name}", daemon=True)
        stopper.start()
        stopper.join(max(0.0, deadline - time.monotonic()))
        took = time.monotonic() - t0
        if stopper.is_alive():
            outcome, detail = "overran", f"stop() had not returned after {took:.1f} s"
            log.error("component %s: %s; left behind", c.name, detail)
        elif error:
            outcome, detail = "raised", f"{type(error[0]).__name__}: {error[0]}"
            log.error("component %s: stop() raised %s", c.name, detail)
        else:
            outcome, detail = "stopped", ""
            log.info("stopped %s in %.2f s", c.name, took)
        left = tuple(self.threads.running(c.name))
        if left and outcome == "stopped":
            log.warning("component %s stopped, but its threads %s still run", c.name, ", ".join(left))
        with self._lock:
            self._state[c.name] = State.STOPPED
        return StopResult(c.name, outcome, took, detail, left)

    def _died(self, death: ThreadDeath) -> None:
        if not self.exit_on_death:
            return
        with self._lock:
            if self._exiting:
                return
            self._exiting = True
        # Not on the dying thread: stop() may wait for that very component.
        threading.Thread(target=self._exit_after_death, args=(death,), name="supervisor-exit", daemon=False).start()

    def _exit_after_death(self, death: ThreadDeath) -> None:
        log.critical(
            "component %s: %s; stopping every component and exiting (status %d)",
            death.component,
            death.describe(),
            EXIT_THREAD_DIED,
        )
        try:
            self.stop()
        finally:
            sys.stdout.flush()  # os._exit (the default) skips interpreter shutdown, and with it the flushes
            sys.stderr.flush()
            self._exit(EXIT_THREAD_DIED)

    # -- health ---------------------------------------------------------------------------------------------------

    def status(self) -> Status:
        """Liveness, readiness and a row per component. Cheap: one ``health()`` read per component, no waiting."""
        now = time.monotonic()
        with self._lock:
            states = dict(self._state)
            start_errors = dict(self._start_error)
        rows = tuple(self._row(c, states[c.name], start_errors.get(c.name), now) for c in self.components)
        live = all(r.live for r in rows)
        return Status(live=live, ready=live and all(r.ready for r in rows), components=rows)

    def _row(self, c: Component, state: State, start_error: str | None, now: float) -> ComponentStatus:
        deaths = tuple(self.threads.deaths(c.name))
        health = _safe_health(c, now)
        age = max(0.0, now - health.last_progress)
        wedged = age > health.timeout
        if deaths:
            live, reason = False, "; ".join(d.describe() for d in deaths)
        elif start_error is not None:
            live, reason = False, f"failed to start: {start_error}"
        elif state is State.NEW:
            live, reason = True, "not started"
        elif not health.alive:
            live, reason = False, health.reason
        elif state is State.RUNNING and wedged:
            live = False
            reason = f"no progress for {age:.1f} s (liveness timeout {health.timeout:g} s); last said: {health.reason}"
        elif state in (State.STOPPING, State.STOPPED):
            live, reason = True, state.value
        else:
            live, reason = True, health.reason
        ready = live and state is State.RUNNING and health.ready
        return ComponentStatus(c.name, state, live, ready, reason, age, health.timeout, deaths)


def _safe_health(c: Component, now: float) -> Health:
    try:
        return c.health()
    except Exception as e:  # a broken health() is the component's failure, not the endpoint's
        return Health(
            alive=False, ready=False, reason=f"health() raised {type(e).__name__}: {e}", last_progress=now, timeout=0.0
        )
