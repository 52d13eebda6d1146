"""The ipset writer: ``ipset restore -exist`` of deltas, reads with ``ipset save``.

``-exist`` makes a repeated add or a delete of a missing member harmless, so a retry after a partial failure (ipset
restore is not atomic: lines before the failing one stay applied) converges instead of failing again.
"""

from __future__ import annotations

from agent.dataplane.cmd import CommandError, Runner
from agent.dataplane.render import KernelSet, parse_ipset_save


class IpsetError(RuntimeError):
    pass


class Ipset:
    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def save(self) -> dict[str, KernelSet]:
        return parse_ipset_save(self.runner.run(["ipset", "save"]).stdout)

    def restore(self, text: str) -> None:
        if not text:
            return
        try:
            self.runner.run(["ipset", "restore", "-exist"], stdin=text)
        except CommandError as exc:
            raise IpsetError(f"ipset restore failed: {exc.stderr}") from exc
