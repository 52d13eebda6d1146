"""A real 3-member etcd cluster (Debian's etcd 3.4) on loopback: distinct ports, one temporary directory.

Members can be paused (SIGSTOP: the process hangs with its sockets open, the way a wedged or swapped-out etcd
looks to a client), resumed, killed and restarted. ``stop()`` kills every member and removes the directory.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from datastore.errors import DatastoreError
from datastore.etcd import EtcdClient, EtcdTLS
from testbed.certs import ServerTLS, etcdctl_tls_args
from testbed.etcd_server import PROGRESS_NOTIFY_INTERVAL, etcd_binary, free_port
from testbed.procs import register_child, unregister_child


def _stopped(pid: int) -> bool:
    """Every thread of ``pid`` is stopped (state "T"); a SIGSTOP is only queued until each is scheduled."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        for tid in tasks:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                if f.read().rsplit(") ", 1)[1][0] != "T":
                    return False
    except OSError:
        return False
    return True


class Member:
    def __init__(self, name: str, directory: Path, tls: bool = False) -> None:
        self.name = name
        self.scheme = "https" if tls else "http"
        self.dir = directory
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.endpoint}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"


class EtcdCluster:
    """``start()`` brings up ``size`` members and waits for a leader; ``stop()`` removes everything it made.

    With ``tls`` every member serves clients only over https (peers still talk plain HTTP on loopback);
    ``client_tls`` is what the test bed itself connects with."""

    def __init__(self, size: int = 3, tls: ServerTLS | None = None, client_tls: EtcdTLS | None = None) -> None:
        if tls is not None and client_tls is None:
            raise ValueError("an etcd cluster with TLS needs client_tls for the test bed's own calls")
        self.tls = tls
        self.client_tls = client_tls
        self.binary = etcd_binary()
        self.dir = Path(tempfile.mkdtemp(prefix="podnet-etcd-cluster-"))
        self.token = f"podnet-{secrets.token_hex(4)}"
        self.members = [Member(f"m{i}", self.dir / f"m{i}", tls is not None) for i in range(size)]

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    @property
    def urls(self) -> list[str]:
        return [m.url for m in self.members]

    def _initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    def start(self, timeout: float = 30.0) -> EtcdCluster:
        try:
            for m in self.members:
                self._spawn(m, state="new")
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, m: Member, state: str) -> None:
        m.dir.mkdir(parents=True, exist_ok=True)
        log = open(m.dir / "etcd.log", "ab")  # noqa: SIM115 - the child owns it for its lifetime
        m.proc = subprocess.Popen(
            [
                self.binary,
                f"--name={m.name}",
                f"--data-dir={m.dir / 'data'}",
                f"--listen-client-urls={m.url}",
                f"--advertise-client-urls={m.url}",
                f"--listen-peer-urls={m.peer_url}",
                f"--initial-advertise-peer-urls={m.peer_url}",
                f"--initial-cluster={self._initial_cluster()}",
                f"--initial-cluster-token={self.token}",
                f"--initial-cluster-state={state}",
                f"--experimental-watch-progress-notify-interval={PROGRESS_NOTIFY_INTERVAL}",
                "--auto-compaction-retention=0",
                "--log-level=warn",
                "--logger=zap",
                *(self.tls.etcd_flags() if self.tls else []),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        register_child(m.proc.pid)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until every running member answers a linearizable read (which needs a leader and a quorum)."""
        deadline = time.monotonic() + timeout
        for m in self.members:
            if m.proc is None or m.paused:
                continue
            with EtcdClient([m.endpoint], timeout=1.0, tls=self.client_tls) as client:
                while True:
                    if m.proc.poll() is not None:
                        raise RuntimeError(f"etcd {m.name} exited with {m.proc.returncode}: {self.log_tail(m)}")
                    try:
                        client.revision()
                        break
                    except DatastoreError:
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"etcd {m.name} not ready in {timeout}s: {self.log_tail(m)}") from None
                        time.sleep(0.1)

    def status(self, m: Member) -> tuple[int, int]:
        """(this member's ID, the leader's ID) as the member reports them (`etcdctl endpoint status`)."""
        out = json.loads(self.etcdctl("endpoint", "status", "-w", "json", endpoints=[m.endpoint], timeout=5))
        status = out[0]["Status"]
        return int(status["header"]["member_id"]), int(status["leader"])

    def leader(self, timeout: float = 15.0) -> Member:
        """The member every running, unpaused member agrees is the leader."""
        deadline = time.monotonic() + timeout
        while True:
            ids: dict[int, Member] = {}
            leaders: set[int] = set()
            try:
                for m in self.members:
                    if m.proc is None or m.paused:
                        continue
                    own, lead = self.status(m)
                    ids[own] = m
                    leaders.add(lead)
            except (subprocess.SubprocessError, KeyError, ValueError):
                leaders = set()
            if len(leaders) == 1 and (lead := next(iter(leaders))) in ids:
                return ids[lead]
            if time.monotonic() > deadline:
                raise RuntimeError(f"no agreed leader in {timeout}s (saw {leaders})")
            time.sleep(0.1)

    def followers(self) -> list[Member]:
        lead = self.leader()
        return [m for m in self.members if m is not lead]

    def pause(self, m: Member) -> None:
        """SIGSTOP: the member hangs with its sockets open; the kernel still completes TCP handshakes."""
        assert m.proc is not None
        os.kill(m.proc.pid, signal.SIGSTOP)
        m.paused = True
        deadline = time.monotonic() + 5
        while not _stopped(m.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.005)

    def resume(self, m: Member) -> None:
        if m.proc is not None and m.paused:
            os.kill(m.proc.pid, signal.SIGCONT)
        m.paused = False

    def kill(self, m: Member) -> None:
        """SIGKILL (data kept)."""
        if m.proc is None:
            return
        m.proc.kill()
        m.proc.wait()
        unregister_child(m.proc.pid)
        m.proc = None
        m.paused = False

    def restart(self, m: Member) -> None:
        self.kill(m)
        self._spawn(m, state="existing")
        self.wait_healthy()

    def etcdctl(self, *args: str, endpoints: list[str] | None = None, timeout: float = 30) -> str:
        """Run etcdctl (the tool operators use) against the cluster, or against ``endpoints``."""
        scheme = "https" if self.tls else "http"
        urls = [e if "://" in e else f"{scheme}://{e}" for e in endpoints or self.endpoints]
        out = subprocess.run(
            ["etcdctl", f"--endpoints={','.join(urls)}", *etcdctl_tls_args(self.client_tls), *args],
            check=True,
            capture_output=True,
            env={**os.environ, "ETCDCTL_API": "3"},
            timeout=timeout,
        )
        return out.stdout.decode()

    def log_tail(self, m: Member, lines: int = 20) -> str:
        try:
            return "\n".join((m.dir / "etcd.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        try:
            for m in self.members:
                self.kill(m)  # SIGKILL ends a stopped process too
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
