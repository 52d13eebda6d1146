"""A real etcd server (Debian's etcd 3.4) on free loopback ports with a temporary data directory."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from datastore.etcd import EtcdClient, EtcdTLS
from testbed.certs import ServerTLS, etcdctl_tls_args
from testbed.procs import register_child, unregister_child

# etcd's default is 10 minutes; a quiet watch then hears nothing for that long. The watcher asks for progress
# itself when a stream is silent (datastore.etcd), so this only makes the test bed behave like a tuned cluster.
PROGRESS_NOTIFY_INTERVAL = "5s"


def etcd_binary(binary: str = "etcd") -> str:
    path = shutil.which(binary)
    if path is None:
        raise RuntimeError(f"{binary} not found: install Debian's etcd-server (scripts/bootstrap does)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdServer:
    """Start with ``start()``; ``restart()`` keeps the data; ``stop()`` removes everything it made.

    With ``tls`` it serves only https (and, with client-cert auth, only to certificates its CA signed);
    ``client_tls`` is what the test bed itself connects with (readiness, compaction, etcdctl)."""

    def __init__(self, binary: str = "etcd", tls: ServerTLS | None = None, client_tls: EtcdTLS | None = None) -> None:
        if tls is not None and client_tls is None:
            raise ValueError("an etcd with TLS needs client_tls for the test bed's own calls")
        self.binary = etcd_binary(binary)
        self.tls = tls
        self.client_tls = client_tls
        self.dir = Path(tempfile.mkdtemp(prefix="podnet-etcd-"))
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.endpoint}"

    def client(self, timeout: float = 5.0) -> EtcdClient:
        """A client the server accepts (with the test bed's TLS material when it has TLS)."""
        return EtcdClient([self.url], timeout=timeout, tls=self.client_tls)

    def start(self, timeout: float = 20.0) -> EtcdServer:
        log = open(self.dir / "etcd.log", "ab")  # noqa: SIM115 - the child owns it for its lifetime
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--name=podnet-test",
                f"--data-dir={self.dir / 'data'}",
                f"--listen-client-urls={self.url}",
                f"--advertise-client-urls={self.url}",
                f"--listen-peer-urls=http://127.0.0.1:{self.peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{self.peer_port}",
                f"--initial-cluster=podnet-test=http://127.0.0.1:{self.peer_port}",
                "--log-level=warn",
                "--logger=zap",
                # Tests compact history on purpose; nothing else should.
                "--auto-compaction-retention=0",
                f"--experimental-watch-progress-notify-interval={PROGRESS_NOTIFY_INTERVAL}",
                *(self.tls.etcd_flags() if self.tls else []),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        register_child(self.proc.pid)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        client = self.client(timeout=1.0)
        try:
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"etcd exited with {self.proc.returncode}: {self.log_tail()}")
                try:
                    client.revision()
                    return
                except Exception:
                    time.sleep(0.05)
        finally:
            client.close()
        raise RuntimeError(f"etcd did not become ready in {timeout}s: {self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join((self.dir / "etcd.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """Stop the process (data kept)."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        unregister_child(self.proc.pid)
        self.proc = None

    def restart(self, down_for: float = 0.0) -> None:
        self.kill()
        if down_for:
            time.sleep(down_for)
        self.start()

    def compact(self) -> int:
        """Compact all history up to the current revision; returns that revision."""
        with self.client() as client:
            rev = client.revision()
            client.compact(rev)
            return rev

    def etcdctl(self, *args: str) -> str:
        """Run etcdctl against this server (the tool operators use)."""
        out = subprocess.run(
            ["etcdctl", f"--endpoints={self.url}", *etcdctl_tls_args(self.client_tls), *args],
            check=True,
            capture_output=True,
            env={**os.environ, "ETCDCTL_API": "3"},
            timeout=30,
        )
        return out.stdout.decode()

    def stop(self) -> None:
        try:
            self.kill()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
