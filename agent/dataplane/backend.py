"""Which iptables backend the node uses: legacy (x_tables) or nft (nf_tables).

Rules in the other backend are invisible to the one we would write, so picking wrongly splits the ruleset. As
kube-proxy's iptables-wrapper and Felix do: an explicit setting wins; else the backend holding kubelet's hint chain
(KUBE-IPTABLES-HINT / KUBE-KUBELET-CANARY) is the node's; else the backend that already holds more rules; a tie
(a fresh node) goes to nft, the default of current distributions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from agent.dataplane.cmd import CommandRunner

BACKENDS = ("legacy", "nft")
HINT_CHAINS = (":KUBE-IPTABLES-HINT", ":KUBE-KUBELET-CANARY")
ENV = "PODNET_IPTABLES_BACKEND"


@dataclass(frozen=True)
class Backend:
    name: str  # "legacy" | "nft"

    @property
    def iptables(self) -> str:
        return f"iptables-{self.name}"

    @property
    def save(self) -> str:
        return f"iptables-{self.name}-save"

    @property
    def restore(self) -> str:
        return f"iptables-{self.name}-restore"


def _dump(runner: CommandRunner, name: str) -> str:
    proc = runner.run([f"iptables-{name}-save"], check=False)
    return proc.stdout if proc.returncode == 0 else ""


def choose(legacy_dump: str, nft_dump: str) -> str:
    """The pure decision, from both backends' ``iptables-save`` output."""
    for name, dump in (("nft", nft_dump), ("legacy", legacy_dump)):
        if any(line.startswith(HINT_CHAINS) for line in dump.splitlines()):
            return name

    def count(dump: str) -> int:
        return sum(1 for line in dump.splitlines() if line.startswith("-A "))

    return "legacy" if count(legacy_dump) > count(nft_dump) else "nft"


def detect(runner: CommandRunner, setting: str | None = None) -> Backend:
    setting = setting or os.environ.get(ENV) or "auto"
    if setting != "auto":
        if setting not in BACKENDS:
            raise ValueError(f"iptables backend must be one of {', '.join(BACKENDS)} or auto, not {setting!r}")
        return Backend(setting)
    return Backend(choose(_dump(runner, "legacy"), _dump(runner, "nft")))
