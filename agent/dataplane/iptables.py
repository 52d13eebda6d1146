"""The iptables writer: ``iptables-restore --noflush --wait`` transactions, reads with ``iptables-save``/``-S``.

Only a failure at COMMIT time is retried: the legacy backend reports a concurrent change of the table (EAGAIN
from the kernel) as a failure of the COMMIT line, and the xtables lock can be busy. Any other failure (a bad
rule, a missing ipset, a chain still referenced) is the same on every attempt and is raised at once, with the
offending input line.
"""

from __future__ import annotations

import logging
import re
import time

from agent.dataplane.backend import Backend
from agent.dataplane.cmd import CommandError, CommandRunner, Started
from agent.dataplane.render import parse_chain_listing

log = logging.getLogger(__name__)

_FAILED_LINE = re.compile(r"line:? (\d+)")
_BARE_FAILURE = re.compile(r"\S+: line (\d+) failed")
_CONTENTION = ("Resource temporarily unavailable", "holding the xtables lock")


class RestoreError(RuntimeError):
    def __init__(self, table: str, message: str, line: str | None) -> None:
        self.table = table
        self.line = line
        self.reason = kernel_reason(message)
        where = f" at {line!r}" if line else ""
        super().__init__(f"iptables-restore of table {table} failed{where}: {message}")


def kernel_reason(stderr: str) -> str:
    """The tool's complaint in one line, without its usage hint (what a refused policy's status shows)."""
    keep = [line.strip() for line in stderr.splitlines() if line.strip() and not line.startswith("Try `")]
    return "; ".join(keep)[:300]


def is_commit_contention(stderr: str, text: str) -> bool:
    if any(s in stderr for s in _CONTENTION):
        return True
    # A bare "line N failed" (no reason given) on COMMIT: legacy's report of a table changed under us. It also
    # reports a rule loop that way; that one fails every attempt and is raised after the last.
    m = _BARE_FAILURE.fullmatch(stderr.strip())
    if m is None:
        return False
    lines = text.splitlines()
    n = int(m.group(1))
    return 0 < n <= len(lines) and lines[n - 1].strip() == "COMMIT"


class Iptables:
    def __init__(self, runner: CommandRunner, backend: Backend, attempts: int = 4, wait_s: float = 5.0) -> None:
        self.runner = runner
        self.backend = backend
        self.attempts = attempts
        self.wait_s = wait_s

    def save(self, table: str) -> str:
        return self.runner.run([self.backend.save, "-t", table]).stdout

    def save_all(self) -> str:
        """Every table the kernel holds (without ``-t``, legacy does not instantiate a table just to list it)."""
        return self.runner.run([self.backend.save]).stdout

    def start_listing(self, wanted: dict[str, list[str]]) -> Listing:
        """Start reading the rules of several chains (table -> chain names) with one process start, without waiting
        (each sync re-reads the built-in chains holding our jumps, so this is on the hot path of every change:
        started first, it runs while the sync writes)."""
        pairs = [(t, c) for t, chains in sorted(wanted.items()) for c in chains]
        if not pairs:
            return Listing([], None)
        ipt = f"{self.backend.iptables} -w {int(self.wait_s)}"
        script = f'while [ $# -gt 0 ]; do {ipt} -t "$1" -S "$2" || exit 1; echo "#end"; shift 2; done'
        args = [x for pair in pairs for x in pair]
        return Listing(pairs, self.runner.start(["sh", "-c", script, "sh", *args], tool="iptables"))

    def restore(self, table: str, text: str) -> None:
        """Apply one table's transaction (``text`` holds ``*table`` … ``COMMIT``)."""
        argv = [self.backend.restore, "--noflush", "--wait", str(int(self.wait_s))]
        for attempt in range(1, self.attempts + 1):
            try:
                self.runner.run(argv, stdin=text)
                return
            except CommandError as exc:
                if attempt < self.attempts and is_commit_contention(exc.stderr, text):
                    log.info("iptables-restore %s: COMMIT contention, retrying (%d): %s", table, attempt, exc.stderr)
                    time.sleep(0.01 * 2**attempt)
                    continue
                m = _FAILED_LINE.search(exc.stderr)
                lines = text.splitlines()
                bad = lines[int(m.group(1)) - 1] if m and 0 < int(m.group(1)) <= len(lines) else None
                raise RestoreError(table, exc.stderr, bad) from exc


class Listing:
    """Rules of built-in chains being read in the background (see ``Iptables.start_listing``)."""

    def __init__(self, pairs: list[tuple[str, str]], started: Started | None) -> None:
        self.pairs = pairs
        self.started = started

    def discard(self) -> None:
        if self.started is not None:
            self.started.abandon()

    def result(self) -> dict[str, dict[str, list[str]]]:
        out: dict[str, dict[str, list[str]]] = {}
        if self.started is None:
            return out
        parts = self.started.finish().split("#end\n")
        for (table, chain), part in zip(self.pairs, parts, strict=False):
            out.setdefault(table, {})[chain] = parse_chain_listing(part)
        return out
