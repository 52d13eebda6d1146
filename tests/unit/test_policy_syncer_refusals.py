"""The reconcile loop's handling of kernel refusals (the dataplane is faked here; the real kernel's refusals are in
tests/netns/test_dataplane_refusal.py and test_dataplane_etcd.py): a refused chain is charged to its policy, the
state is computed again at once with that policy refused, the refusal holds until the policy changes, each change
is logged once, and failing syncs back off exponentially."""

from __future__ import annotations

import itertools
import logging
import time

import pytest

from agent.calc.policy import PolicyStatus
from agent.calc.state import Chain, DataplaneState
from agent.dataplane.policy_syncer import Backoff, Desired, PolicySyncer
from agent.dataplane.programmer import SyncResult
from agent.dataplane.render import chain_of_line, transaction
from agent.policy_feed import RejectedLog, simulate_missing_match

POLICY = "ns/p"
CHAIN = "podnet-pi-p"


class FakeKernel:
    """Takes every chain except one holding a rule with "BAD" (reported as refused, as the programmer does)."""

    def __init__(self) -> None:
        self.applied: list[DataplaneState] = []

    def apply(self, state: DataplaneState, full: bool = False, delete_stale: bool = False) -> SyncResult:
        self.applied.append(state)
        result = SyncResult(full=full, chains_written=[f"filter/{n}" for n in state.tables.get("filter", {})])
        result.refused = {
            f"filter/{c.name}": "RULE_APPEND failed (No such file or directory)"
            for c in state.tables.get("filter", {}).values()
            if any("BAD" in r for r in c.rules)
        }
        return result


class Source:
    """A policy whose compiled chain holds a rule the kernel refuses while ``bad``; compiled to allow nothing while
    the syncer says it is refused (what compile_node(refused=...) does)."""

    def __init__(self) -> None:
        self.version = 1
        self.bad = True
        self.syncer: PolicySyncer | None = None

    def desired(self) -> Desired:
        assert self.syncer is not None
        if POLICY in self.syncer.refused:
            rules: tuple[str, ...] = ("-j RETURN",)
        else:
            rules = ("-m BAD -j MARK", "-j RETURN") if self.bad else ("-s 10.0.0.1 -j MARK", "-j RETURN")
        chains = {CHAIN: Chain(CHAIN, rules), "podnet-tw-x": Chain("podnet-tw-x", (f"-j {CHAIN}",))}
        return Desired(
            self.version,
            DataplaneState(tables={"filter": chains}),
            source_of=lambda chain: POLICY if chain == CHAIN else None,
            version_of=lambda source: self.version if source == POLICY else None,
        )


def make(kernel: FakeKernel, source: Source) -> PolicySyncer:
    syncer = PolicySyncer(kernel, source.desired)  # type: ignore[arg-type]
    source.syncer = syncer
    return syncer


def messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_a_refused_policy_is_recompiled_closed_and_kept_until_it_changes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    kernel, source = FakeKernel(), Source()
    syncer = make(kernel, source)

    report = syncer.sync_once()
    assert report is not None and report.refused == {POLICY: "RULE_APPEND failed (No such file or directory)"}
    assert syncer.refused == dict(report.refused)
    # Written twice in that one sync: as compiled, then with the policy refused (its chain allowing nothing).
    assert [s.tables["filter"][CHAIN].rules for s in kernel.applied] == [
        ("-m BAD -j MARK", "-j RETURN"),
        ("-j RETURN",),
    ]
    assert report.result.refused == {}  # the closed version was taken

    for _ in range(5):  # later syncs: still refused, not retried, not logged again
        again = syncer.sync_once()
        assert again is not None and POLICY in again.refused
    assert all(s.tables["filter"][CHAIN].rules == ("-j RETURN",) for s in kernel.applied[2:])
    assert len(messages(caplog, "refused by the kernel")) == 1

    # The policy changes (still bad): tried once, refused again, logged again once.
    source.version = 2
    syncer.sync_once()
    assert [s.tables["filter"][CHAIN].rules[0] for s in kernel.applied[-2:]] == ["-m BAD -j MARK", "-j RETURN"]
    assert len(messages(caplog, "trying it in the kernel again")) == 1
    assert len(messages(caplog, "refused by the kernel")) == 2
    assert syncer.refusals[POLICY].version == 2

    # Fixed: written as compiled, no longer refused.
    source.version, source.bad = 3, False
    report = syncer.sync_once()
    assert report is not None and report.refused == {} and syncer.refused == {}
    assert kernel.applied[-1].tables["filter"][CHAIN].rules[0] == "-s 10.0.0.1 -j MARK"


def test_a_refused_chain_of_no_policy_is_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    kernel = FakeKernel()
    state = DataplaneState(tables={"filter": {"podnet-x": Chain("podnet-x", ("-m BAD",))}})
    syncer = PolicySyncer(kernel, lambda: Desired(1, state))  # type: ignore[arg-type]
    for _ in range(3):
        syncer.sync_once()
    assert syncer.unowned_refused == {"filter/podnet-x": "RULE_APPEND failed (No such file or directory)"}
    assert syncer.refused == {}
    assert len(messages(caplog, "chain filter/podnet-x refused by the kernel")) == 1
    assert len(kernel.applied) == 3  # nothing to recompile: no policy to charge it to


def test_failing_syncs_back_off_exponentially_up_to_a_cap() -> None:
    b = Backoff(1.0, 30.0)
    assert [b.next() for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    b.reset()
    assert b.next() == 1

    attempts: list[float] = []

    def failing() -> Desired:
        attempts.append(time.monotonic())
        raise RuntimeError("etcd is away")

    syncer = PolicySyncer(FakeKernel(), failing, retry_interval=0.05, max_retry_interval=0.2)  # type: ignore[arg-type]
    syncer.start()
    syncer.mark_dirty()
    time.sleep(0.8)
    syncer.stop()
    # 0.05 + 0.1 + 0.2 + 0.2 + 0.2: at most 6 attempts in 0.8 s (a fixed 0.05 s retry makes 16)
    assert 2 <= len(attempts) <= 6, len(attempts)
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert gaps[1] > gaps[0] * 1.5
    assert isinstance(syncer.last_error, RuntimeError)


def test_rejected_policies_are_logged_once_per_change(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    log = RejectedLog()
    bad = {("ns", "p"): PolicyStatus("ns", "p", False, "spec.ingress: expected a list")}
    for _ in range(3):
        log.update(bad)
    assert len(messages(caplog, "rejected")) == 1
    log.update({("ns", "p"): PolicyStatus("ns", "p", False, "refused by the kernel: no ipvs")})
    assert len(messages(caplog, "rejected")) == 2
    log.update({("ns", "p"): PolicyStatus("ns", "p", True)})
    log.update({})
    assert messages(caplog, "no longer rejected") == ["policy ns/p no longer rejected"]


def test_the_missing_match_hook_alters_only_rules_that_use_that_match() -> None:
    rules = ("-p sctp -m sctp --dport 5432 -j MARK --set-xmark 0x10000/0x10000", "-p tcp -m tcp --dport 80 -j RETURN")
    state = DataplaneState(tables={"filter": {"podnet-pi-x": Chain("podnet-pi-x", rules)}})
    altered = simulate_missing_match(state, "sctp").tables["filter"]["podnet-pi-x"].rules
    assert altered == ("-p sctp -m ipvs --vport 5432 -j MARK --set-xmark 0x10000/0x10000", rules[1])


def test_restore_lines_name_their_chain() -> None:
    assert chain_of_line("-A podnet-pi-x -j RETURN") == "podnet-pi-x"
    assert chain_of_line(":podnet-pi-x - [0:0]") == "podnet-pi-x"
    assert chain_of_line("-I FORWARD 1 -j podnet-FORWARD") is None
    assert chain_of_line("COMMIT") is None and chain_of_line(None) is None
    assert transaction("nat", ["podnet-a"], ["-A podnet-a -j RETURN"]) == (
        "*nat\n:podnet-a - [0:0]\n-A podnet-a -j RETURN\nCOMMIT\n"
    )
