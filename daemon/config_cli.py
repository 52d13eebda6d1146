"""The configuration's command-line side: one flag per option for argparse (the future ``podnet-agent`` and its
subcommands share them), which config file to read, and ``load``: flags + environment + file (+ cluster config)
-> ``Resolved``.

Flags are kept as text (``default=SUPPRESS``: a flag not given is absent, not its default) and parsed by
``config.resolve`` like every other source, so an error reads the same wherever the value came from:
``flag --sync-period: 'soon' is not a duration``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

from daemon import config as c
from daemon import config_values as v
from datastore import model as m


def _help(option: c.Option) -> str:
    text = f"{option.help} [env {option.env}; file key {option.key}; default: {c.default_text(option)}]"
    return text.replace("%", "%%")


def add_options(parser: argparse.ArgumentParser) -> None:
    """``--config`` and a flag for every option, in groups."""
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help=f"YAML config file [env {c.CONFIG_ENV}; default: {c.DEFAULT_CONFIG_FILE}, if it exists]",
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for option in c.OPTIONS:
        group = groups.get(option.group)
        if group is None:
            group = groups[option.group] = parser.add_argument_group(option.group)
        if isinstance(option.kind, v.Bool):
            group.add_argument(
                option.flag,
                dest=option.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=_help(option),
            )
        else:
            group.add_argument(
                option.flag, dest=option.name, metavar=option.metavar, default=argparse.SUPPRESS, help=_help(option)
            )


def build_parser(prog: str = "podnet-agent", description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_options(parser)
    return parser


def flags_of(namespace: argparse.Namespace) -> tuple[dict[str, object], str | None]:
    """The options given on the command line (option name -> value) and ``--config`` if given."""
    given = vars(namespace)
    flags = {name: value for name, value in given.items() if name in c.BY_NAME}
    path = given.get("config")
    return flags, (str(path) if path is not None else None)


def config_file(flag: str | None, env: Mapping[str, str]) -> tuple[str, bool]:
    """The config file's path and whether it was asked for (then it must exist): ``--config`` >
    ``$PODNET_CONFIG`` > the default path (read only if it exists)."""
    if flag:
        return flag, True
    if env.get(c.CONFIG_ENV, "").strip():
        return env[c.CONFIG_ENV].strip(), True
    return c.DEFAULT_CONFIG_FILE, False


def read_config_file(path: str, required: bool) -> str | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except FileNotFoundError:
        if required:
            raise c.ConfigError(f"config file {path}: no such file") from None
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise c.ConfigError(f"config file {path}: cannot read it ({exc})") from None


def load(
    namespace: argparse.Namespace,
    env: Mapping[str, str] | None = None,
    cluster: m.ClusterConfig | None = None,
    hostname: str | None = None,
) -> c.Resolved:
    """Resolve the configuration from parsed flags, the environment and the config file it names (read now: call
    again on SIGHUP), and the cluster config once it has been read from etcd."""
    env = os.environ if env is None else env
    flags, flag_path = flags_of(namespace)
    path, required = config_file(flag_path, env)
    text = read_config_file(path, required)
    return c.resolve(flags, env, text, cluster, file_path=path, hostname=hostname)
