"""Entry point of `agentctl`, the operator's CLI. Sub-command groups live in their own modules.

Every failure reaches the operator as one line on stderr and a non-zero exit status, never as a traceback: etcd
errors are turned into click errors where the top group invokes its sub-command (so tests through click's runner
see the same as a shell), and ``main`` catches whatever is left. ``--debug`` lets the traceback through.
"""

from __future__ import annotations

import os
import sys

# gRPC's C core writes TLS handshake failures to stderr itself; the operator gets them as the one Error: line. It
# reads this when grpc is imported, hence before the imports below; only in the console script, --debug keeps them.
if (__name__ == "__main__" or os.path.basename(sys.argv[0]) == "agentctl") and "--debug" not in sys.argv[1:]:
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import argparse
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import click

from agent.ctl import bgp as bgp_cmds
from agent.ctl import policy as policy_cmds
from agent.ctl import resources as resource_cmds
from agent.ctl.context import CtlContext, default_node
from agent.ctl.ipam import ipam_group
from datastore.cli_options import seconds
from datastore.errors import DatastoreError, Unavailable
from datastore.etcd import DEFAULT_TIMEOUT, EtcdTLS, endpoint_target

_T = TypeVar("_T")


def version() -> str:
    try:
        return metadata.version("podnet")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def etcd_error(exc: DatastoreError, endpoints: str, timeout: float) -> str:
    """What an etcd failure means to the operator, naming the endpoints tried."""
    if isinstance(exc, Unavailable):
        detail = str(exc).removeprefix("etcd unavailable: ")
        return _one_line(f"cannot reach etcd at {endpoints} (timeout {timeout:g} s): {detail}")
    return _one_line(f"etcd at {endpoints}: {exc}")


class CtlGroup(click.Group):
    """The top group: turns failures of any sub-command into one-line click errors."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except DatastoreError as exc:
            if ctx.params.get("debug"):
                raise
            raise click.ClickException(
                etcd_error(exc, ctx.params.get("etcd_endpoints", "?"), ctx.obj.timeout if ctx.obj else DEFAULT_TIMEOUT)
            ) from None
        except UnicodeDecodeError as exc:
            if ctx.params.get("debug"):
                raise
            # Keys and values are UTF-8 by contract; a foreign writer can break that.
            raise click.ClickException(_one_line(f"etcd holds a key or value that is not UTF-8: {exc}")) from None
        except Exception as exc:
            if ctx.params.get("debug"):
                raise
            raise click.ClickException(
                _one_line(f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)")
            ) from None


class Duration(click.ParamType[float]):
    """Seconds, written as podnet-agent takes durations: 5s, 500ms, 1m, or a number."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float | int):
            return float(value)
        try:
            return seconds(value)
        except argparse.ArgumentTypeError as exc:
            self.fail(str(exc), param, ctx)


def _deprecated(ctx: click.Context, name: str, value: _T, old: str, old_value: _T | None) -> _T:
    """The value of option ``name``, or of its old spelling ``old`` if only that was given on the command line."""
    if old_value is None:
        return value
    new = "--" + name.replace("_", "-")
    click.echo(f"agentctl: {old} is deprecated, use {new}", err=True)
    if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE:
        return value
    return old_value


@click.group(cls=CtlGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--etcd-endpoints",
    envvar="PODNET_ETCD_ENDPOINTS",
    show_envvar=True,
    default="127.0.0.1:2379",
    show_default=True,
    help="Comma-separated etcd endpoints (host:port, or https://host:port with TLS).",
)
@click.option(
    "--etcd-ca-file",
    envvar="PODNET_ETCD_CA_FILE",
    show_envvar=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="CA certificate that signs etcd's server certificates (turns TLS on).",
)
@click.option(
    "--etcd-cert-file",
    envvar="PODNET_ETCD_CERT_FILE",
    show_envvar=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Client certificate for etcd (TLS; with --etcd-key-file).",
)
@click.option(
    "--etcd-key-file",
    envvar="PODNET_ETCD_KEY_FILE",
    show_envvar=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The client certificate's private key (with --etcd-cert-file).",
)
@click.option(
    "--node-name",
    envvar="PODNET_NODE_NAME",
    show_envvar=True,
    default=None,
    help="This node's name (default: the host name).",
)
@click.option(
    "--etcd-timeout",
    envvar="PODNET_ETCD_TIMEOUT",
    show_envvar=True,
    type=Duration(),
    default=DEFAULT_TIMEOUT,
    show_default=True,
    help="Deadline of each etcd request (e.g. 5s, 500ms, or a number of seconds).",
)
# The spellings before podnet-agent's: hidden, still working, with one warning.
@click.option("--node", "old_node", default=None, hidden=True, help="Deprecated: --node-name.")
@click.option(
    "--timeout", "old_timeout", type=Duration(), default=None, hidden=True, help="Deprecated: --etcd-timeout."
)
@click.option("--debug", is_flag=True, help="Show the Python traceback of an unexpected error.")
@click.version_option(version(), "--version", prog_name="agentctl", message="%(prog)s (podnet) %(version)s")
@click.pass_context
def cli(
    ctx: click.Context,
    *,
    etcd_endpoints: str,
    etcd_ca_file: Path | None,
    etcd_cert_file: Path | None,
    etcd_key_file: Path | None,
    node_name: str | None,
    etcd_timeout: float,
    old_node: str | None,
    old_timeout: float | None,
    debug: bool,
) -> None:
    """Inspect and operate podnet: BGP status, routes, IPAM, policy."""
    node_name = _deprecated(ctx, "node_name", node_name, "--node", old_node)
    timeout = _deprecated(ctx, "etcd_timeout", etcd_timeout, "--timeout", old_timeout)
    endpoints = [e.strip() for e in etcd_endpoints.split(",") if e.strip()]
    tls = None
    try:
        # Checked here, before any command runs, so a wrong scheme or an unreadable file is one clear line.
        if etcd_ca_file or etcd_cert_file or etcd_key_file:
            tls = EtcdTLS(etcd_ca_file, etcd_cert_file, etcd_key_file)
            tls.credentials()
        for endpoint in endpoints:
            endpoint_target(endpoint, tls is not None)
    except ValueError as exc:
        raise click.ClickException(_one_line(str(exc))) from None
    ctl = CtlContext(endpoints, node_name or default_node(), timeout, tls)
    ctx.obj = ctl
    ctx.call_on_close(ctl.close)


@click.command("version")
def version_cmd() -> None:
    """The installed podnet version (needs no etcd)."""
    click.echo(f"agentctl (podnet) {version()}")


# Command groups, one module per topic (agent/ctl/<topic>.py), registered here.
COMMANDS: list[click.Command] = [
    bgp_cmds.status,
    bgp_cmds.routes,
    ipam_group,
    policy_cmds.policy_group,
    *resource_cmds.COMMANDS,
    version_cmd,
]
for command in COMMANDS:
    cli.add_command(command)


def main() -> int:
    debug = "--debug" in sys.argv[1:]
    try:
        rc = cli.main(prog_name="agentctl", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        return 1
    except KeyboardInterrupt:
        click.echo("Aborted.", err=True)
        return 130
    except Exception as exc:  # what escaped the group (option parsing, closing the client)
        if debug:
            raise
        click.echo(_one_line(f"Error: unexpected {type(exc).__name__}: {exc}"), err=True)
        return 1
    # Without standalone mode click returns the code of a command's ctx.exit(n) instead of raising it.
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
