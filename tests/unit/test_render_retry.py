"""The iptables writer retries a COMMIT that lost a race and nothing else (the tool runs are scripted here; the
real tools are exercised by tests/netns/test_dataplane_*.py)."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

import pytest

from agent.dataplane.backend import Backend
from agent.dataplane.cmd import CommandError, CommandRunner
from agent.dataplane.iptables import Iptables, RestoreError

TEXT = "*filter\n:podnet-a - [0:0]\n-A podnet-a -j ACCEPT\nCOMMIT\n"


class ScriptedRunner(CommandRunner):
    """Answers each tool run with the next scripted failure, then with success."""

    def __init__(self, failures: list[str]) -> None:
        super().__init__()
        object.__setattr__(self, "failures", failures)  # CommandRunner is a frozen dataclass
        object.__setattr__(self, "calls", [])

    def run(self, cmd: Sequence[str], stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        self.calls.append((list(cmd), stdin))
        if self.failures:
            raise CommandError(cmd, 1, self.failures.pop(0))
        return subprocess.CompletedProcess(list(cmd), 0, "", "")


def test_commit_contention_is_retried_until_it_goes_through() -> None:
    runner = ScriptedRunner(["iptables-restore: line 4 failed", "Another app is currently holding the xtables lock."])
    Iptables(runner, Backend("legacy")).restore("filter", TEXT)
    calls = runner.calls
    assert len(calls) == 3
    assert calls[0][0] == ["iptables-legacy-restore", "--noflush", "--wait", "5"] and calls[0][1] == TEXT


def test_other_failures_are_raised_at_once_with_the_offending_line() -> None:
    runner = ScriptedRunner(
        ["iptables-restore v1.8.9 (legacy): Couldn't load target `nosuch'\n\nError occurred at line: 3"]
    )
    with pytest.raises(RestoreError, match="-A podnet-a -j ACCEPT") as err:
        Iptables(runner, Backend("legacy")).restore("filter", TEXT)
    assert err.value.line == "-A podnet-a -j ACCEPT"
    assert len(runner.calls) == 1


def test_contention_that_never_ends_gives_up() -> None:
    runner = ScriptedRunner(["iptables-restore: line 4 failed"] * 10)
    with pytest.raises(RestoreError, match="COMMIT"):
        Iptables(runner, Backend("legacy"), attempts=3).restore("filter", TEXT)
    assert len(runner.calls) == 3
