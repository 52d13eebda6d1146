"""The CNI server reaches an etcd that requires client certificates: with the TLS files given to the server
(``podnet-cni serve --etcd-ca-file … --etcd-cert-file … --etcd-key-file …``, or ``Clients(tls=…)`` when embedded), or
named in the network configuration (``etcdCAFile``/``etcdCertFile``/``etcdKeyFile``). STATUS is the probe: "no enabled
IP pool" means etcd answered, and after a pool is added it succeeds; without TLS the https:// endpoint is refused as a
configuration error naming the reason."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cni import main as client
from cni.plugin import Clients
from cni.server import CniServer
from datastore import model as m
from datastore.etcd import EtcdClient, EtcdTLS
from datastore.store import Store
from ipam.pools import add_pool
from testbed.certs import CertAuthority, CertPair, ServerTLS
from testbed.etcd_server import EtcdServer

pytestmark = pytest.mark.integration

PLUGIN = str(Path(sys.executable).parent / "podnet-cni")


@pytest.fixture(scope="module")
def tls_etcd() -> Iterator[tuple[EtcdServer, CertAuthority, CertPair]]:
    ca = CertAuthority("podnet-cni-test-ca")
    server: EtcdServer | None = None
    try:
        cert = ca.server()
        pair = ca.client()
        server = EtcdServer(
            tls=ServerTLS(cert.cert, cert.key, ca.cert), client_tls=EtcdTLS(ca.cert, pair.cert, pair.key)
        )
        server.start()
        yield server, ca, pair
    finally:
        if server is not None:
            server.stop()
        ca.remove()


def status(socket: str, url: str, **conf: Any) -> tuple[int, dict[str, Any]]:
    netconf = {"cniVersion": "1.1.0", "name": "podnet", "type": "podnet", "etcdEndpoints": [url], **conf}
    answer = client.forward(socket, {"CNI_COMMAND": "STATUS"}, json.dumps(netconf).encode())
    assert answer is not None
    code, out, _ = answer
    return code, json.loads(out) if out.strip() else {}


def serve(path: str, clients: Clients) -> tuple[CniServer, threading.Thread]:
    server = CniServer(path, clients=clients)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    return server, thread


def stop(server: CniServer, thread: threading.Thread) -> None:
    server.shutdown()
    thread.join(10)
    server.server_close()


def test_tls_from_the_server_and_from_the_network_config(
    tls_etcd: tuple[EtcdServer, CertAuthority, CertPair], tmp_path: Path
) -> None:
    etcd, ca, pair = tls_etcd
    files = {"etcdCAFile": str(ca.cert), "etcdCertFile": str(pair.cert), "etcdKeyFile": str(pair.key)}
    with_tls = Clients(tls=EtcdTLS(ca.cert, pair.cert, pair.key), timeout=3)
    plain = Clients(timeout=3)
    s1, t1 = serve(str(tmp_path / "tls.sock"), with_tls)
    s2, t2 = serve(str(tmp_path / "plain.sock"), plain)
    try:
        code, out = status(s1.path, etcd.url)
        assert (code, out["code"], out["msg"]) == (1, 50, "no enabled IP pool: new pods cannot get an address")
        code, out = status(s2.path, etcd.url)
        assert (code, out["code"]) == (1, 7)
        assert "https:// but no etcd TLS files" in out["msg"]
        code, out = status(s2.path, etcd.url, **files)  # the network config's files: the plain server gets through
        assert (code, out["code"]) == (1, 50)
        code, out = status(s1.path, etcd.url, etcdCertFile=str(pair.cert))
        assert (code, out["code"], out["msg"]) == (
            1, 7, "etcdCertFile and etcdKeyFile go together: give both or neither",
        )  # fmt: skip
        with EtcdClient([etcd.url], tls=EtcdTLS(ca.cert, pair.cert, pair.key)) as admin:
            add_pool(Store(admin), m.IPPool("10.244.0.0/16"))
            assert status(s1.path, etcd.url) == (0, {})
            assert status(s2.path, etcd.url, **files) == (0, {})
    finally:
        stop(s1, t1)
        stop(s2, t2)
        with_tls.close()
        plain.close()


def test_podnet_cni_serve_takes_the_agents_tls_flags(
    tls_etcd: tuple[EtcdServer, CertAuthority, CertPair], tmp_path: Path
) -> None:
    etcd, ca, pair = tls_etcd
    sock = str(tmp_path / "cni.sock")
    argv = [PLUGIN, "serve", "--cni-socket", sock, "--etcd-ca-file", str(ca.cert), "--etcd-cert-file", str(pair.cert),
            "--etcd-key-file", str(pair.key), "--etcd-timeout", "3s"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == f"ready {sock}"
        code, out = status(sock, etcd.url)
        assert code == 0 or out["code"] == 50, out  # etcd answered (whether the other test's pool is there or not)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "STATUS - -> " in err and "deprecated" not in err


def test_an_unreadable_tls_file_stops_serve_at_start(tmp_path: Path) -> None:
    missing = tmp_path / "nope.crt"
    proc = subprocess.run([PLUGIN, "serve", "--cni-socket", str(tmp_path / "s"), "--etcd-ca-file", str(missing)],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert proc.returncode == 2
    assert f"etcd TLS CA file {missing}: No such file or directory" in proc.stderr
    assert not (tmp_path / "s").exists()  # refused before it listened
