"""etcd over TLS with client certificates, against a real etcd started with --client-cert-auth: the right CA and
client certificate can read, write and watch (the client and agentctl); a missing client certificate, one from
another CA, trusting the wrong CA and a plain-text client fail at once with a message that names the problem."""

from __future__ import annotations

import queue
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from agent.ctl.main import cli
from datastore import keys as k
from datastore import model as m
from datastore.errors import Unavailable
from datastore.etcd import EtcdClient, EtcdTLS
from datastore.store import Store
from datastore.watcher import Update, Updated, Watcher
from testbed.certs import CertAuthority, CertPair, ServerTLS
from testbed.etcd_server import EtcdServer

pytestmark = pytest.mark.integration

FAIL_WITHIN = 3.0  # seconds: a handshake failure must be reported, not retried until some deadline


@dataclass
class Bed:
    server: EtcdServer
    ca: CertAuthority
    client: CertPair
    other_ca: CertAuthority  # an unrelated CA: its client certificates are refused, it does not sign etcd's

    @property
    def tls(self) -> EtcdTLS:
        return EtcdTLS(self.ca.cert, self.client.cert, self.client.key)


@pytest.fixture(scope="module")
def bed() -> Iterator[Bed]:
    ca = CertAuthority("podnet-test-ca")
    other = CertAuthority("other-ca")
    server: EtcdServer | None = None
    try:
        cert = ca.server()
        client = ca.client()
        tls = EtcdTLS(ca.cert, client.cert, client.key)
        server = EtcdServer(tls=ServerTLS(cert.cert, cert.key, ca.cert), client_tls=tls).start()
        yield Bed(server, ca, client, other)
    finally:
        if server is not None:
            server.stop()
        ca.remove()
        other.remove()


def agentctl(bed: Bed, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--etcd-endpoints", bed.server.url, "--etcd-timeout", "2", *args])


def fails_clearly(client: EtcdClient) -> str:
    t0 = time.monotonic()
    with pytest.raises(Unavailable) as err:
        client.get("/podnet/v1/nodes/x")
    assert time.monotonic() - t0 < FAIL_WITHIN
    return str(err.value)


def test_client_with_the_ca_and_a_client_certificate_reads_writes_and_watches(bed: Bed) -> None:
    updates: queue.Queue[Update] = queue.Queue()
    with EtcdClient([bed.server.url], timeout=2, tls=bed.tls) as client:
        client.put("/tls/a", b"1")
        got = client.get("/tls/a")
        assert got is not None and got.value == b"1"
        watcher = Watcher(client, k.NODES_PREFIX, updates.put).start()
        try:
            node = m.Node("tls-node", "192.168.77.21/24")
            Store(client).put(node)
            deadline = time.monotonic() + 5
            seen: list[Update] = []
            while not any(isinstance(u, Updated) and u.value == node for u in seen):
                seen.append(updates.get(timeout=max(deadline - time.monotonic(), 0.01)))
        finally:
            watcher.stop()
    # etcd holds it: etcdctl with the same files reads it back.
    assert "tls-node" in bed.server.etcdctl("get", "--prefix", k.NODES_PREFIX, "--keys-only")


def test_agentctl_with_tls_options_and_environment(bed: Bed) -> None:
    with EtcdClient([bed.server.url], tls=bed.tls) as client:
        Store(client).put(m.Node("ctl-node", "192.168.77.22/24"))
    files = ["--etcd-ca-file", str(bed.ca.cert), "--etcd-cert-file", str(bed.client.cert)]
    res = agentctl(bed, *files, "--etcd-key-file", str(bed.client.key), "get", "nodes")
    assert res.exit_code == 0, res.output
    assert "ctl-node" in res.output and "192.168.77.22/24" in res.output
    env = {
        "PODNET_ETCD_CA_FILE": str(bed.ca.cert),
        "PODNET_ETCD_CERT_FILE": str(bed.client.cert),
        "PODNET_ETCD_KEY_FILE": str(bed.client.key),
    }
    res = CliRunner().invoke(cli, ["--etcd-endpoints", bed.server.url, "get", "nodes"], env=env)
    assert res.exit_code == 0 and "ctl-node" in res.output, res.output


def test_client_without_a_client_certificate_is_refused_clearly(bed: Bed) -> None:
    with EtcdClient([bed.server.url], timeout=2, tls=EtcdTLS(bed.ca.cert)) as client:
        msg = fails_clearly(client)
    assert "TLS handshake failed" in msg and "requires a client certificate (none given)" in msg, msg

    t0 = time.monotonic()
    res = agentctl(bed, "--etcd-ca-file", str(bed.ca.cert), "get", "nodes")
    assert time.monotonic() - t0 < FAIL_WITHIN
    lines = res.output.splitlines()
    assert res.exit_code == 1 and len(lines) == 1, res.output
    assert lines[0].startswith(f"Error: cannot reach etcd at {bed.server.url}"), lines[0]
    assert "requires a client certificate (none given)" in lines[0], lines[0]

    # The program itself: gRPC's own log lines about the handshake do not reach the operator.
    args = [
        "--etcd-endpoints",
        bed.server.url,
        "--etcd-timeout",
        "2",
        "--etcd-ca-file",
        str(bed.ca.cert),
        "get",
        "nodes",
    ]
    cmd = [sys.executable, "-m", "agent.ctl.main", *args]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and proc.stdout == "", proc
    assert proc.stderr.splitlines() == [lines[0]], proc.stderr


def test_client_certificate_from_another_ca_is_refused_clearly(bed: Bed) -> None:
    stranger = bed.other_ca.client("stranger")
    with EtcdClient([bed.server.url], timeout=2, tls=EtcdTLS(bed.ca.cert, stranger.cert, stranger.key)) as client:
        msg = fails_clearly(client)
    assert f"etcd rejected the client certificate {stranger.cert}" in msg, msg


def test_client_trusting_the_wrong_ca_fails_clearly(bed: Bed) -> None:
    tls = EtcdTLS(bed.other_ca.cert, bed.client.cert, bed.client.key)
    with EtcdClient([bed.server.url], timeout=2, tls=tls) as client:
        msg = fails_clearly(client)
    assert f"etcd's server certificate is not signed by the CA in {bed.other_ca.cert}" in msg, msg

    files = ["--etcd-ca-file", str(bed.other_ca.cert), "--etcd-cert-file", str(bed.client.cert)]
    res = agentctl(bed, *files, "--etcd-key-file", str(bed.client.key), "get", "nodes")
    lines = res.output.splitlines()
    assert res.exit_code == 1 and len(lines) == 1 and "server certificate is not signed" in lines[0], res.output


def test_plain_text_client_does_not_hang(bed: Bed) -> None:
    with EtcdClient([bed.server.endpoint], timeout=2) as client:
        fails_clearly(client)


def test_schemes_and_files_are_checked_up_front(bed: Bed, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"https://127\.0\.0\.1:1 is https:// but no etcd TLS files"):
        EtcdClient(["https://127.0.0.1:1"])
    with pytest.raises(ValueError, match=r"http://127\.0\.0\.1:1 is plain http:// but etcd TLS files are set"):
        EtcdClient(["http://127.0.0.1:1"], tls=bed.tls)
    missing = tmp_path / "missing.crt"
    with pytest.raises(ValueError, match=f"etcd TLS CA file {missing}: No such file or directory"):
        EtcdClient([bed.server.url], tls=EtcdTLS(missing))
    not_pem = tmp_path / "empty.key"
    not_pem.write_text("")
    with pytest.raises(ValueError, match=f"etcd TLS client key file {not_pem}: not a PEM file"):
        EtcdClient([bed.server.url], tls=EtcdTLS(bed.ca.cert, bed.client.cert, not_pem))
    with pytest.raises(ValueError, match="give both"):
        EtcdTLS(bed.ca.cert, bed.client.cert)

    res = agentctl(bed, "--etcd-ca-file", str(missing), "get", "nodes")
    assert res.exit_code == 1 and res.output == f"Error: etcd TLS CA file {missing}: No such file or directory\n"
    res = CliRunner().invoke(cli, ["--etcd-endpoints", bed.server.url, "get", "nodes"])
    assert res.exit_code == 1 and "is https:// but no etcd TLS files" in res.output, res.output
