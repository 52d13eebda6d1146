"""A process that owns one node's Speaker, as the agent does (for tests that SIGKILL the owner):

    python -m tests.netns.bgp_owner NODE WORKDIR NETNS PREFIX NAME=IP/LEN...

It meshes with every other NAME (hold 3 s, graceful restart 10 s), announces PREFIX, and runs until SIGTERM
(then stops the speaker, withdrawing) or SIGKILL (then nothing of ours may be left running)."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from bgp.plan import Defaults, identity, plan_peers
from bgp.speaker import Speaker, SpeakerConfig
from datastore import model as m


def main(argv: list[str]) -> int:
    node, workdir, netns, prefix, *nodes = argv
    models = {name: m.Node(name=name, ip=ip) for name, ip in (n.split("=", 1) for n in nodes)}
    cfg = m.ClusterConfig()
    sp = Speaker(SpeakerConfig(identity(models[node], cfg), backoff_initial=0.2), Path(workdir), netns=netns)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    sp.start()
    sp.set_peers(plan_peers(node, models, cfg, (), Defaults(hold_time=3, graceful_restart_time=10)))
    sp.announce([prefix])
    print("started", flush=True)
    done.wait()
    sp.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
