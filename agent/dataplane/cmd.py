"""Running the kernel tools (iptables-restore, ipset, …), optionally inside a network namespace.

The agent itself runs in the host namespace and passes no namespace; tests and benchmarks point a writer at a
namespace they created, so nothing they do can reach the machine's own tables.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

from agent.dataplane.stats import Counters


class CommandError(RuntimeError):
    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        super().__init__(f"{' '.join(self.argv)} exited {returncode}: {self.stderr}")


def tool_of(cmd: Sequence[str]) -> str:
    """The tool a command runs, as the metrics name it: the backend left out (``iptables-nft-restore`` and
    ``iptables-legacy-restore`` are both ``iptables-restore``)."""
    name = os.path.basename(cmd[0]) if cmd else ""
    for backend in ("-nft", "-legacy"):
        if name.startswith("iptables" + backend) or name.startswith("ip6tables" + backend):
            return name.replace(backend, "", 1)
    return name


@dataclass(frozen=True)
class CommandStats:
    """Commands started and failed (non-zero exit, or timed out), by tool; read by the daemon's metrics."""

    calls: Counters = field(default_factory=Counters)
    errors: Counters = field(default_factory=Counters)


@dataclass(frozen=True)
class CommandRunner:
    netns: str | None = None
    timeout: float = 60.0
    stats: CommandStats = field(default_factory=CommandStats, compare=False, repr=False)

    def argv(self, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *cmd] if self.netns else list(cmd)

    def start(self, cmd: Sequence[str], tool: str | None = None) -> Started:
        """Start ``cmd`` without waiting: its output is collected by ``Started.finish``. ``tool``: what to count
        it as when ``cmd`` is a shell running the tool."""
        argv = self.argv(cmd)
        tool = tool or tool_of(cmd)
        self.stats.calls.add(tool)
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        except OSError:
            self.stats.errors.add(tool)
            raise
        return Started(argv, proc, self.timeout, tool, self.stats)

    def run(self, cmd: Sequence[str], stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = self.argv(cmd)
        tool = tool_of(cmd)
        self.stats.calls.add(tool)
        try:
            proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=self.timeout, check=False)
        except (OSError, subprocess.TimeoutExpired):
            self.stats.errors.add(tool)
            raise
        if proc.returncode != 0:
            self.stats.errors.add(tool)
            if check:
                raise CommandError(argv, proc.returncode, proc.stderr or proc.stdout)
        return proc


@dataclass
class Started:
    argv: list[str]
    proc: subprocess.Popen[str]
    timeout: float
    tool: str = ""
    stats: CommandStats | None = None

    def abandon(self) -> None:
        """Kill it and reap it (its output is not wanted any more)."""
        self.proc.kill()
        self.proc.communicate()

    def finish(self) -> str:
        """Its standard output; CommandError if it failed."""
        try:
            out, err = self.proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.abandon()
            self._failed()
            raise CommandError(self.argv, -9, "timed out") from None
        if self.proc.returncode != 0:
            self._failed()
            raise CommandError(self.argv, self.proc.returncode, err or out)
        return out

    def _failed(self) -> None:
        if self.stats is not None:
            self.stats.errors.add(self.tool)
