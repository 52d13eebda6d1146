"""Command-line options that several podnet programs take, spelled as ``podnet-agent`` spells them
(``daemon/config.py``): ``--etcd-endpoints`` and ``PODNET_ETCD_ENDPOINTS`` name the same thing in every program.

An option's variable is its flag in capitals with ``PODNET_``; a flag given on the command line wins over the
variable. Old spellings are kept as hidden aliases that print one deprecation line on stderr, so scripts written
for them keep working. It lives here, under every program's layer, because ``agent``, ``cni`` and ``lab`` may not
import each other.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from datastore.etcd import EtcdTLS

ENV_PREFIX = "PODNET_"
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def env_name(flag: str) -> str:
    """``--etcd-ca-file`` -> ``PODNET_ETCD_CA_FILE``."""
    return ENV_PREFIX + flag.removeprefix("--").replace("-", "_").upper()


def seconds(text: str) -> float:
    """A positive duration as the agent takes it: ``30s``, ``5m``, ``1h30m``, ``250ms`` or a number of seconds."""
    try:
        value = float(text)
    except ValueError:
        if not text or _DURATION.sub("", text) != "":
            raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 30s, 5m, 1h30m)") from None
        value = sum(float(n) * _UNITS[unit] for n, unit in _DURATION.findall(text))
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive duration")
    return value


class _Deprecated(argparse.Action):
    """An old spelling: stores into the new option's destination and says once that it is deprecated."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str, **kwargs: Any) -> None:
        self.new = new
        self._warned: argparse.Namespace | None = None
        super().__init__(option_strings, dest, **kwargs)

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None
    ) -> None:
        if self._warned is not namespace:  # once per command line, however often it is given
            self._warned = namespace
            print(f"{parser.prog}: {option} is deprecated, use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_option(
    container: argparse._ActionsContainer,
    flag: str,
    help: str,
    *,
    default: object = None,
    aliases: Sequence[str] = (),
    env: bool = True,
    type: Callable[[str], Any] | None = None,
    metavar: str | None = None,
    choices: Sequence[str] | None = None,
) -> None:
    """``flag`` with its variable as the default (when ``env``), and ``aliases`` as hidden deprecated spellings."""
    dest = flag.removeprefix("--").replace("-", "_")
    text = help
    if env:
        variable = env_name(flag)
        default = os.environ.get(variable) or default  # a string default goes through ``type`` like a flag
        text += f" [env {variable}]"
    if default is not None and not isinstance(default, bool):
        text += f" (default: {default})"
    kwargs: dict[str, Any] = {"type": type, "metavar": metavar, "choices": choices}
    container.add_argument(flag, dest=dest, default=default, help=text.replace("%", "%%"), **kwargs)
    for old in aliases:
        container.add_argument(old, dest=dest, action=_Deprecated, new=flag, help=argparse.SUPPRESS, **kwargs)


def add_etcd_tls(container: argparse._ActionsContainer) -> None:
    """``--etcd-ca-file``, ``--etcd-cert-file``, ``--etcd-key-file`` (``etcd_tls`` reads them)."""
    add_option(container, "--etcd-ca-file", "CA certificate that signs etcd's server certificates (TLS).",
               type=Path, metavar="PATH")  # fmt: skip
    add_option(container, "--etcd-cert-file", "Client certificate for etcd (TLS; with --etcd-key-file).",
               type=Path, metavar="PATH")  # fmt: skip
    add_option(container, "--etcd-key-file", "The client certificate's private key (with --etcd-cert-file).",
               type=Path, metavar="PATH")  # fmt: skip


def etcd_tls(args: argparse.Namespace) -> EtcdTLS | None:
    """The TLS files given, or None (plain TLS-less etcd). ValueError: a certificate without its key or the
    reverse, or a file that cannot be read."""
    if not (args.etcd_ca_file or args.etcd_cert_file or args.etcd_key_file):
        return None
    tls = EtcdTLS(args.etcd_ca_file, args.etcd_cert_file, args.etcd_key_file)
    tls.credentials()  # read the files now: a missing one is one clear line at start, not a failure per request
    return tls


def endpoint_list(text: str | None) -> list[str]:
    return [e.strip() for e in (text or "").split(",") if e.strip()]
