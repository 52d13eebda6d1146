"""Entry point of `agentctl`, the operator's CLI. Sub-command groups live in their own modules."""

from __future__ import annotations

import sys

import click

from agent.ctl import bgp as bgp_cmds
from agent.ctl import policy as policy_cmds
from agent.ctl.context import CtlContext, default_node
from agent.ctl.ipam import ipam_group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--etcd-endpoints",
    envvar="PODNET_ETCD_ENDPOINTS",
    default="127.0.0.1:2379",
    show_default=True,
    help="Comma-separated etcd endpoints (host:port).",
)
@click.option("--node", envvar="PODNET_NODE_NAME", default=None, help="This node's name (default: hostname).")
@click.pass_context
def cli(ctx: click.Context, etcd_endpoints: str, node: str | None) -> None:
    """Inspect and operate podnet: BGP status, routes, IPAM, policy."""
    ctl = CtlContext([e.strip() for e in etcd_endpoints.split(",") if e.strip()], node or default_node())
    ctx.obj = ctl
    ctx.call_on_close(ctl.close)


# Command groups, one module per topic (agent/ctl/<topic>.py), registered here.
COMMANDS: list[click.Command] = [bgp_cmds.status, bgp_cmds.routes, ipam_group, *policy_cmds.COMMANDS]
for command in COMMANDS:
    cli.add_command(command)


def main() -> int:
    try:
        rc = cli.main(prog_name="agentctl", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        return 1
    # Without standalone mode click returns the code of a command's ctx.exit(n) instead of raising it.
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
