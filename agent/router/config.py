"""The router's configuration (``podnet-agent`` fills it from its own, the command line from its flags)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bgp import speaker as speaker_module
from bgp.plan import Defaults
from bgp.speaker import SpeakerConfig


@dataclass(frozen=True)
class RouterConfig:
    node: str
    workdir: Path  # the speaker's files (ExaBGP config, bridge socket, log)
    netns: str | None = None  # run the dataplane and ExaBGP in this network namespace
    bgp_defaults: Defaults = field(default_factory=Defaults)
    resync: float = 10.0
    bgp_poll: float = 0.5
    coalesce_quiet: float = 0.001  # a pass starts once changes pause this long...
    coalesce_max: float = 0.01  # ...or this long after the first change of a burst
    settle: float = 2.0
    startup_grace: float = 30.0
    status_ttl: int = 20
    exabgp_log_level: str = "INFO"
    log_level: str | None = None  # podnet's loggers, fixed (a command-line flag); None: the cluster config's
    exabgp_reactor_speed: float = SpeakerConfig.reactor_speed  # ExaBGP's idle poll is speed/100 s (docs/bgp.md)
    # Seconds ExaBGP may run without its API bridge before the speaker restarts it (slow machines, emulated
    # guests: raise it). The speaker's default, read when the config is made.
    bridge_timeout: float = field(default_factory=lambda: speaker_module.BRIDGE_TIMEOUT)

    def __post_init__(self) -> None:
        if not self.bridge_timeout > 0:
            raise ValueError(f"bridge_timeout must be positive, not {self.bridge_timeout!r}")
