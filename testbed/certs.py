"""Throw-away TLS material for the test bed, made with the ``openssl`` command in a temporary directory: a CA, a
server certificate for 127.0.0.1 and client certificates signed by it. EC P-256 keys: generating them takes
milliseconds, where RSA keys would take most of a second each on this machine."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from datastore.etcd import EtcdTLS

DAYS = "2"  # the material lives for one test run


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


class CertAuthority:
    """A CA in ``directory`` (created here unless given); ``server()`` and ``client()`` issue certificates."""

    def __init__(self, name: str = "podnet-test-ca", directory: Path | None = None) -> None:
        if shutil.which("openssl") is None:
            raise RuntimeError("openssl not found (Debian package openssl)")
        self.owns_dir = directory is None
        self.dir = directory or Path(tempfile.mkdtemp(prefix="podnet-certs-"))
        self.name = name
        self.cert = self.dir / f"{name}.crt"
        self.key = self.dir / f"{name}.key"
        _openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(self.key), "-out", str(self.cert), "-days", DAYS, "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=self.dir,
        )  # fmt: skip

    def _issue(self, name: str, extensions: list[str]) -> CertPair:
        pair = CertPair(self.dir / f"{name}.crt", self.dir / f"{name}.key")
        csr = self.dir / f"{name}.csr"
        ext = self.dir / f"{name}.ext"
        ext.write_text("\n".join(extensions) + "\n")
        _openssl(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(pair.key), "-out", str(csr), "-subj", f"/CN={name}",
            cwd=self.dir,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key), "-CAcreateserial",
            "-out", str(pair.cert), "-days", DAYS, "-extfile", str(ext),
            cwd=self.dir,
        )  # fmt: skip
        return pair

    def server(self, name: str = "etcd-server", ip: str = "127.0.0.1") -> CertPair:
        """A certificate etcd can serve (and use as a peer): valid for ``ip`` and localhost."""
        return self._issue(
            name,
            [
                "basicConstraints=CA:FALSE",
                "keyUsage=critical,digitalSignature,keyEncipherment",
                "extendedKeyUsage=serverAuth,clientAuth",
                f"subjectAltName=IP:{ip},DNS:localhost",
            ],
        )

    def client(self, name: str = "podnet-client") -> CertPair:
        return self._issue(
            name,
            [
                "basicConstraints=CA:FALSE",
                "keyUsage=critical,digitalSignature,keyEncipherment",
                "extendedKeyUsage=clientAuth",
            ],
        )

    def remove(self) -> None:
        if self.owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


@dataclass(frozen=True)
class ServerTLS:
    """What etcd is started with: its certificate and the CA its clients' certificates must chain to."""

    cert: Path
    key: Path
    trusted_ca: Path
    client_cert_auth: bool = True

    def etcd_flags(self) -> list[str]:
        flags = [f"--cert-file={self.cert}", f"--key-file={self.key}", f"--trusted-ca-file={self.trusted_ca}"]
        if self.client_cert_auth:
            flags.append("--client-cert-auth")
        return flags


def etcdctl_tls_args(tls: EtcdTLS | None) -> list[str]:
    """etcdctl's flags for the same files."""
    if tls is None:
        return []
    files = (("cacert", tls.ca_file), ("cert", tls.cert_file), ("key", tls.key_file))
    return [f"--{flag}={path}" for flag, path in files if path is not None]
