"""What every agentctl command shares: where etcd is, which node we are on, the output format."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

import click

from datastore.etcd import DEFAULT_TIMEOUT, EtcdClient, EtcdTLS


@dataclass
class CtlContext:
    endpoints: list[str]
    node: str
    timeout: float = DEFAULT_TIMEOUT  # seconds per etcd request
    tls: EtcdTLS | None = None
    _client: EtcdClient | None = field(default=None, repr=False)

    @property
    def client(self) -> EtcdClient:
        if self._client is None:
            self._client = EtcdClient(self.endpoints, timeout=self.timeout, tls=self.tls)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def default_node() -> str:
    return os.environ.get("PODNET_NODE_NAME") or socket.gethostname()


pass_ctl = click.make_pass_decorator(CtlContext)

output_option = click.option(
    "-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True, help="Output format."
)
