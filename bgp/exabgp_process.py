"""The ExaBGP child of one speaker: its configuration file, environment, start (dying with its owner), kill, the
pidfile that lets the next owner replace an ExaBGP a previous one left behind, and the restart-with-backoff loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bgp.speaker import SpeakerConfig

log = logging.getLogger("bgp.speaker")  # the speaker's messages, under the name operators filter on

BEAT = 2.0  # the supervision loop's longest wait: it reports progress at least this often
STALE_KILL_WAIT = 5.0  # how long a replaced ExaBGP gets to go after SIGKILL


class ExabgpProcess:
    def __init__(self, config: SpeakerConfig, workdir: Path, netns: str | None) -> None:
        self.config = config
        self.netns = netns
        self.conf_path = workdir / "exabgp.conf"
        self.log_path = workdir / "exabgp.log"
        self.pid_path = workdir / "exabgp.pid"
        self.config_text = ""

    def write_config(self, text: str) -> bool:
        """Write the configuration file if ``text`` differs from what it holds; whether it did."""
        if text == self.config_text:
            return False
        tmp = self.conf_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it may hold MD5 passwords
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, self.conf_path)
        self.config_text = text
        return True

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "exabgp_daemon_user": "root",  # else it drops to nobody and cannot run the venv's bridge
                "exabgp_daemon_drop": "false",
                "exabgp_daemon_daemonize": "false",
                "exabgp_tcp_bind": self.config.identity.local_address,  # it only listens when bind is set
                "exabgp_tcp_port": str(self.config.port),
                "exabgp_api_ack": "true",
                "exabgp_api_respawn": "true",
                "exabgp_api_cli": "false",
                "exabgp_api_encoder": "json",
                "exabgp_log_destination": "stdout",
                "exabgp_log_level": self.config.log_level,
                "exabgp_reactor_speed": str(self.config.reactor_speed),
            }
        )
        return env

    def command(self) -> list[str]:
        # bgp.launch arms the parent-death signal in the process that execs ExaBGP (``ip netns exec`` execs too,
        # so ExaBGP keeps our PID as its parent and the signal).
        cmd = [self.config.python, "-m", "bgp.launch", str(os.getpid()), self.config.exabgp, "server"]
        cmd.append(str(self.conf_path))
        if self.netns is not None:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        return cmd

    def spawn(self) -> subprocess.Popen[bytes]:
        if shutil.which(self.config.exabgp) is None:  # else only the launcher would fail, after it started
            raise FileNotFoundError(2, "No such file or directory", self.config.exabgp)
        with open(self.log_path, "ab") as logfile:
            proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                env=self.env(),
                start_new_session=True,
            )
        try:
            self.pid_path.write_text(f"{proc.pid}\n")
        except OSError as exc:  # it runs all the same; only a next owner could not find it if it outlived us
            log.warning("cannot write %s: %s", self.pid_path, exc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes], sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def forget(self) -> None:
        """Our ExaBGP is gone for good: the next owner has nothing to replace."""
        with contextlib.suppress(FileNotFoundError):
            self.pid_path.unlink()

    # ---- an ExaBGP left behind -------------------------------------------------------------------------------

    def is_ours(self, pid: int) -> bool:
        """Whether ``pid`` runs our ExaBGP with our configuration file (a PID reused by anything else is not)."""
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            return False
        exabgp = Path(self.config.exabgp).name
        return str(self.conf_path) in args and any(Path(a).name == exabgp for a in args)

    def replace_stale(self) -> int | None:
        """Kill the ExaBGP a previous owner of this workdir left running (named by the pidfile), if it is still
        ours; the PID killed, if any. SIGKILL, as ``stop(withdraw=False)``: no NOTIFICATION, so peers with
        graceful restart keep our routes until the new ExaBGP has re-sent them."""
        try:
            pid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None
        if pid <= 1 or not _alive(pid) or not self.is_ours(pid):
            self.forget()
            return None
        group = _pgid(pid) == pid  # started in its own session: its bridge helper is in that group too
        log.warning(
            "ExaBGP %d from a previous run of %s is still running (%s); killing it before starting ours",
            pid,
            self.config.identity.node,
            self.conf_path,
        )
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + STALE_KILL_WAIT
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        self.forget()
        return pid


def _alive(pid: int) -> bool:
    """Running (a zombie is not: its sockets are closed)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _pgid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[2])
    except (OSError, ValueError, IndexError):
        return None


class Supervisor:
    """Runs ExaBGP again when it exits, with exponential backoff (reset after 30 s of running). ``launch`` starts
    one (None: it could not, or we are stopping: see ``stop``); ``exited(code, backoff)`` is told each exit and
    answers whether to go on. ``beat`` is called each round and at least every ``BEAT`` seconds while waiting."""

    def __init__(self, config: SpeakerConfig, stop: threading.Event, beat: Callable[[], None]) -> None:
        self.config = config
        self.stop = stop
        self.beat = beat
        self.backoff = config.backoff_initial  # the wait before the next start

    def run(
        self,
        launch: Callable[[], subprocess.Popen[bytes] | None],
        exited: Callable[[int, float], bool],
    ) -> None:
        self.backoff = self.config.backoff_initial
        while not self.stop.is_set():
            self.beat()
            proc = launch()
            if self.stop.is_set():
                return
            if proc is None:
                if self._pause(self.backoff):
                    return
                self.backoff = min(self.backoff * 2, self.config.backoff_max)
                continue
            started = time.monotonic()
            code = self._wait(proc)
            if not exited(code, self.backoff):
                return
            if time.monotonic() - started > 30:
                self.backoff = self.config.backoff_initial
            if self._pause(self.backoff):
                return
            self.backoff = min(self.backoff * 2, self.config.backoff_max)

    def _wait(self, proc: subprocess.Popen[bytes]) -> int:
        """Wait for ``proc`` to exit, beating. Not ``proc.wait(timeout)``: that polls every 50 ms, and an idle
        node's speaker should cost nothing; a pidfd becomes readable when the process exits."""
        try:
            pidfd: int | None = os.pidfd_open(proc.pid)
        except OSError:  # gone already (or a kernel without pidfds)
            pidfd = None
        try:
            while True:
                code = proc.poll()
                if code is not None:
                    return code
                if pidfd is None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        return proc.wait(timeout=BEAT)
                elif select.select([pidfd], [], [], BEAT)[0]:
                    time.sleep(0.01)  # exited: stop() may be reaping it in another thread
                self.beat()
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def _pause(self, seconds: float) -> bool:
        """Sleep, beating; whether we are stopping."""
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return self.stop.is_set()
            if self.stop.wait(min(left, BEAT)):
                return True
            self.beat()
