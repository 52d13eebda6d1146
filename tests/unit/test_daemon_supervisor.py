"""The supervisor with real component loops on real threads: start order, reverse stop within one deadline even when
a component hangs, a dead or wedged loop fails liveness naming its component, readiness with a reason per component,
and exit on a thread's death (in this process with a recorded exit, and as a real process)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest

from daemon import report
from daemon.component import Health
from daemon.supervisor import EXIT_THREAD_DIED, StartError, State, Supervisor
from daemon.threads import Threads
from tests.unit.daemon_fake import Journal, LoopComponent, wait_for


@pytest.fixture
def journal() -> Journal:
    return Journal()


@pytest.fixture
def threads() -> Threads:
    return Threads()


@pytest.fixture
def made() -> Iterator[list[LoopComponent]]:
    """Every component a test makes; their hanging stops are released at the end so no thread outlives the test."""
    comps: list[LoopComponent] = []
    yield comps
    for c in comps:
        c.unblock.set()
        c.quit.set()


def make(
    made: list[LoopComponent], threads: Threads, journal: Journal, *names: str, **kw: object
) -> list[LoopComponent]:
    comps = [LoopComponent(n, threads, journal, **kw) for n in names]  # type: ignore[arg-type]
    made.extend(comps)
    return comps


def test_starts_in_order_and_stops_in_reverse_within_the_deadline(
    made: list[LoopComponent], threads: Threads, journal: Journal
) -> None:
    comps = make(made, threads, journal, "datastore", "policy", "routes", "cni")
    sup = Supervisor(comps, threads, grace=4.0)
    sup.start()
    assert journal.of("start") == ["datastore", "policy", "routes", "cni"]
    wait_for(lambda: sup.status().ready)

    t0 = time.monotonic()
    results = sup.stop()
    assert time.monotonic() - t0 < 1.0  # nothing hangs: nobody waits for a share it does not need
    assert journal.of("stop") == ["cni", "routes", "policy", "datastore"]
    assert [r.name for r in results] == ["cni", "routes", "policy", "datastore"]
    assert {r.outcome for r in results} == {"stopped"}
    assert all(r.threads_left == () for r in results)
    # Each deadline lies within the overall one (t0 + 4 s): the first is given a quarter of the time left.
    deadlines = [journal.deadlines[n] for n in ("cni", "routes", "policy", "datastore")]
    assert deadlines[0] - t0 == pytest.approx(1.0, abs=0.1)
    assert all(d <= t0 + 4.0 + 0.01 for d in deadlines)
    assert all(not c.thread or not c.thread.is_alive() for c in comps)
    # Threads that ended because they were asked to are no deaths.
    assert sup.status().live
    assert [c.state for c in sup.status().components] == [State.STOPPED] * 4
    assert sup.stop() == results  # a second stop (SIGTERM twice) is the first one


def test_a_hanging_stop_is_reported_and_not_waited_on_past_its_share(
    made: list[LoopComponent], threads: Threads, journal: Journal
) -> None:
    first, hung, last = make(made, threads, journal, "first", "hung", "last")
    hung.hang_on_stop = True
    sup = Supervisor([first, hung, last], threads, grace=3.0)
    sup.start()

    t0 = time.monotonic()
    results = sup.stop()
    took = time.monotonic() - t0
    # "last" stops at once, "hung" is given half of the ~3 s left, "first" the remaining ~1.5 s and needs none.
    assert 1.4 < took < 3.0
    by_name = {r.name: r for r in results}
    assert by_name["hung"].outcome == "overran"
    assert "had not returned after 1.5 s" in by_name["hung"].detail
    assert by_name["hung"].threads_left == ("hung-loop",)
    assert by_name["first"].outcome == by_name["last"].outcome == "stopped"
    assert journal.of("stopped") == ["last", "first"]  # first was still stopped after hung overran
    assert journal.deadlines["first"] <= t0 + 3.0 + 0.01


def test_the_overall_deadline_holds_when_every_stop_hangs(
    made: list[LoopComponent], threads: Threads, journal: Journal
) -> None:
    comps = make(made, threads, journal, "a", "b", "c", hang_on_stop=True)
    sup = Supervisor(comps, threads, grace=1.5)
    sup.start()
    t0 = time.monotonic()
    results = sup.stop()
    assert time.monotonic() - t0 == pytest.approx(1.5, abs=0.2)
    assert [(r.name, r.outcome) for r in results] == [("c", "overran"), ("b", "overran"), ("a", "overran")]


def test_a_component_thread_that_raises_fails_liveness_naming_it(
    made: list[LoopComponent], threads: Threads, journal: Journal
) -> None:
    routes, policy = make(made, threads, journal, "routes", "policy")
    sup = Supervisor([routes, policy], threads)
    sup.start()
    wait_for(lambda: sup.status().ready)

    policy.crash.set()
    wait_for(lambda: not sup.status().live)
    status = sup.status()
    assert not status.ready
    assert [c.name for c in status.not_live()] == ["policy"]
    row = status.not_live()[0]
    assert row.reason == "thread policy-loop died: RuntimeError: boom in policy"
    assert "Traceback" in row.deaths[0].traceback
    assert report.liveness_text(status).splitlines()[0] == (
        "not live: policy: thread policy-loop died: RuntimeError: boom in policy"
    )
    # The death stays: the component is in an unknown state until the process restarts.
    time.sleep(0.1)
    assert not sup.status().live
    sup.stop(time.monotonic() + 2)


def test_a_loop_that_returns_unasked_is_a_death(made: list[LoopComponent], threads: Threads, journal: Journal) -> None:
    (bgp,) = make(made, threads, journal, "bgp")
    sup = Supervisor([bgp], threads)
    sup.start()
    bgp.quit.set()
    wait_for(lambda: not sup.status().live)
    assert sup.status().not_live()[0].reason == "thread bgp-loop died: returned"
    sup.stop(time.monotonic() + 2)


def test_a_wedged_loop_fails_liveness_after_its_timeout_and_recovers(
    made: list[LoopComponent], threads: Threads, journal: Journal
) -> None:
    fast, slow = make(made, threads, journal, "fast", "slow", timeout=0.3)
    sup = Supervisor([fast, slow], threads)
    sup.start()
    wait_for(lambda: sup.status().ready)

    slow.wedge.set()
    time.sleep(0.15)
    assert sup.status().live  # within its timeout
    wait_for(lambda: not sup.status().live, timeout=2)
    (row,) = sup.status().not_live()
    assert row.name == "slow"
    assert row.reason.startswith("no progress for 0.")
    assert "(liveness timeout 0.3 s); last said: in sync" in row.reason
    assert row.progress_age > 0.3

    slow.wedge.clear()  # a slow pass that ends: live again (only deaths are final)
    wait_for(lambda: sup.status().live)
    sup.stop(time.monotonic() + 2)


def test_readiness_needs_every_component_and_says_why_not(
    made: list[LoopComponent], threads: Threads, journal: Journal
) -> None:
    datastore, bgp = make(made, threads, journal, "datastore", "bgp")
    bgp.report(False, "bgp: 0 of 2 peers established")
    sup = Supervisor([datastore, bgp], threads)
    sup.start()
    wait_for(lambda: sup.status().components[0].ready)

    status = sup.status()
    assert status.live and not status.ready
    lines = report.readiness_text(status).splitlines()
    assert lines[0] == "not ready: bgp"
    assert lines[1].split() == ["component", "state", "live", "ready", "progress", "reason"]
    assert lines[2].split()[:4] == ["datastore", "running", "yes", "yes"]
    assert lines[2].endswith("in sync")
    assert lines[3].split()[:4] == ["bgp", "running", "yes", "no"]
    assert lines[3].endswith("bgp: 0 of 2 peers established")

    bgp.report(True, "bgp: 2 of 2 peers established")
    wait_for(lambda: sup.status().ready)
    assert report.readiness_text(sup.status()).splitlines()[0] == "ready"
    sup.stop(time.monotonic() + 2)


def test_before_start_and_while_stopping_nothing_is_ready_but_all_is_live(
    made: list[LoopComponent], threads: Threads, journal: Journal
) -> None:
    a, b = make(made, threads, journal, "a", "b")
    sup = Supervisor([a, b], threads)
    status = sup.status()
    assert status.live and not status.ready
    assert [(c.state, c.reason) for c in status.components] == [(State.NEW, "not started")] * 2
    sup.start()
    wait_for(lambda: sup.status().ready)
    sup.stop(time.monotonic() + 2)
    status = sup.status()
    assert status.live and not status.ready
    assert {c.reason for c in status.components} == {"stopped"}


def test_a_start_that_fails_stops_what_was_started_and_names_the_component(
    made: list[LoopComponent], threads: Threads, journal: Journal
) -> None:
    a, b, c = make(made, threads, journal, "a", "b", "c")
    b.fail_start = True
    sup = Supervisor([a, b, c], threads)
    with pytest.raises(StartError, match="component b failed to start: RuntimeError: b cannot start"):
        sup.start()
    assert journal.of("start") == ["a", "b"]
    assert journal.of("stop") == ["b", "a"]
    assert a.thread is not None and not a.thread.is_alive()
    status = sup.status()
    assert not status.live
    assert status.not_live()[0].reason == "failed to start: RuntimeError: b cannot start"


def test_a_health_that_raises_or_says_dead_fails_liveness(
    made: list[LoopComponent], threads: Threads, journal: Journal
) -> None:
    class Broken(LoopComponent):
        def health(self) -> Health:
            raise KeyError("oops")

    broken = Broken("broken", threads, journal)
    (gone,) = make(made, threads, journal, "gone")
    made.append(broken)
    sup = Supervisor([broken, gone], threads)
    sup.start()
    gone.heartbeat.dead("its watch thread ended")
    status = sup.status()
    assert [(c.name, c.reason) for c in status.not_live()] == [
        ("broken", "health() raised KeyError: 'oops'"),
        ("gone", "its watch thread ended"),
    ]
    sup.stop(time.monotonic() + 2)


def test_exit_on_death_stops_everything_in_reverse_then_exits_70(
    made: list[LoopComponent], threads: Threads, journal: Journal
) -> None:
    comps = make(made, threads, journal, "a", "b", "c")
    exited: list[int] = []
    done = threading.Event()

    def fake_exit(code: int) -> None:
        exited.append(code)
        done.set()

    sup = Supervisor(comps, threads, exit_on_death=True, exit=fake_exit, grace=5)
    sup.start()
    comps[1].crash.set()
    assert done.wait(5)
    assert exited == [EXIT_THREAD_DIED]
    assert journal.of("stop") == ["c", "b", "a"]
    assert not sup.status().live


def test_exit_on_death_ends_a_real_process_with_status_70_naming_the_component() -> None:
    script = textwrap.dedent(
        """
        import logging, time
        from daemon.supervisor import Supervisor
        from daemon.threads import Threads
        from tests.unit.daemon_fake import Journal, LoopComponent
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
        threads = Threads()
        a, b = (LoopComponent(n, threads, Journal()) for n in ("datastore", "policy"))
        Supervisor([a, b], threads, exit_on_death=True, grace=5).start()
        time.sleep(0.2)
        b.crash.set()
        time.sleep(30)
        print("still running")
        """
    )
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == EXIT_THREAD_DIED, proc.stderr
    assert time.monotonic() - t0 < 10
    assert "still running" not in proc.stdout
    assert "CRITICAL component policy: thread policy-loop died: RuntimeError: boom in policy" in proc.stderr
    assert "stopping every component and exiting (status 70)" in proc.stderr
    assert proc.stderr.index("stopped policy") < proc.stderr.index("stopped datastore")


def test_names_must_be_unique_and_added_before_start(
    made: list[LoopComponent], threads: Threads, journal: Journal
) -> None:
    with pytest.raises(ValueError, match="unique"):
        Supervisor(make(made, threads, journal, "a", "a"), threads)
    a, b, c = make(made, threads, journal, "a", "b", "c")
    sup = Supervisor([a], threads)
    sup.add(b)
    with pytest.raises(ValueError, match="unique"):
        sup.add(b)
    sup.start()
    assert journal.of("start") == ["a", "b"]
    with pytest.raises(RuntimeError, match="before the supervisor starts"):
        sup.add(c)
    sup.stop(time.monotonic() + 2)
