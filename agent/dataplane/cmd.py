"""Running the kernel tools (iptables-restore, ipset, …), optionally inside a network namespace.

The agent itself runs in the host namespace and passes no namespace; tests and benchmarks point a writer at a
namespace they created, so nothing they do can reach the machine's own tables.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass


class CommandError(RuntimeError):
    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        super().__init__(f"{' '.join(self.argv)} exited {returncode}: {self.stderr}")


@dataclass(frozen=True)
class Runner:
    netns: str | None = None
    timeout: float = 60.0

    def argv(self, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *cmd] if self.netns else list(cmd)

    def start(self, cmd: Sequence[str]) -> Started:
        """Start ``cmd`` without waiting: its output is collected by ``Started.finish``."""
        argv = self.argv(cmd)
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        return Started(argv, proc, self.timeout)

    def run(self, cmd: Sequence[str], stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = self.argv(cmd)
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=self.timeout, check=False)
        if check and proc.returncode != 0:
            raise CommandError(argv, proc.returncode, proc.stderr or proc.stdout)
        return proc


@dataclass
class Started:
    argv: list[str]
    proc: subprocess.Popen[str]
    timeout: float

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
            raise CommandError(self.argv, -9, "timed out") from None
        if self.proc.returncode != 0:
            raise CommandError(self.argv, self.proc.returncode, err or out)
        return out
