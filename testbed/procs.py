"""Track the child processes the test bed starts, so a run can prove it left none behind."""

from __future__ import annotations

import contextlib
import os
import signal
import threading

_lock = threading.Lock()
_children: set[int] = set()


def register_child(pid: int) -> None:
    with _lock:
        _children.add(pid)


def unregister_child(pid: int) -> None:
    with _lock:
        _children.discard(pid)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes: reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(") ", 1)[1][0] != "Z"
        except OSError:
            return False


def leaked_children() -> list[int]:
    """Registered children still running."""
    with _lock:
        pids = sorted(_children)
    return [p for p in pids if alive(p)]


def kill_registered() -> None:
    """Last-resort cleanup: kill every registered child still alive (only ours, by PID)."""
    for pid in leaked_children():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        unregister_child(pid)
