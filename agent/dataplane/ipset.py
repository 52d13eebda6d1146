"""The ipset writer: ``ipset restore -exist`` of deltas, reads with ``ipset save``.

``-exist`` makes a repeated add or a delete of a missing member harmless, so a retry after a partial failure (ipset
restore is not atomic: lines before the failing one stay applied) converges instead of failing again.
"""

from __future__ import annotations

from collections.abc import Callable

from agent.dataplane.cmd import CommandError, CommandRunner
from agent.dataplane.render import KernelSet, parse_ipset_save


class IpsetError(RuntimeError):
    pass


class Ipset:
    def __init__(self, runner: CommandRunner) -> None:
        self.runner = runner

    def save(self) -> dict[str, KernelSet]:
        return parse_ipset_save(self.runner.run(["ipset", "save"]).stdout)

    def start_save(self) -> Callable[[], dict[str, KernelSet]]:
        """``save`` started in the background (a full sync reads the tables meanwhile); call the result for it."""
        started = self.runner.start(["ipset", "save"])
        return lambda: parse_ipset_save(started.finish())

    def restore(self, text: str) -> None:
        if not text:
            return
        try:
            self.runner.run(["ipset", "restore", "-exist"], stdin=text)
        except CommandError as exc:
            raise IpsetError(f"ipset restore failed: {exc.stderr}") from exc
