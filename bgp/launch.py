"""``python -m bgp.launch PARENT_PID PROGRAM ARG...``: exec PROGRAM so that it is SIGKILLed when its parent dies.

The speaker starts ExaBGP through this (inside ``ip netns exec``, which execs without forking): the signal is set
in the process that becomes ExaBGP, so an owner that is SIGKILLed does not leave an orphaned ExaBGP announcing our
routes and holding port 179. The kernel sends it when the *thread* that forked us exits: the speaker forks from
its supervision thread, which lives as long as the ExaBGP it waits for.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent goes; exit at once if it has gone already."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:  # the parent died before the signal was armed: nobody would send it
        os._exit(1)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0].isdigit():
        sys.stderr.write("usage: python -m bgp.launch PARENT_PID PROGRAM [ARG...]\n")
        return 2
    die_with_parent(int(argv[0]))
    os.execvp(argv[1], argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
