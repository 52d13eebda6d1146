"""One spelling of every option across podnet's command lines: an option that names the same thing as one of
podnet-agent's (``daemon/config.py``) has the agent's flag and reads the agent's variable; the old spellings still
work, hidden, with one deprecation line on stderr; every visible option has a help text.

Each CLI's parser is built as its entry point builds it (``build_parser``; agentctl's click group)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator

import click
import pytest
from click.testing import CliRunner

from agent.ctl import main as agentctl
from agent.ctl.context import CtlContext
from agent.dataplane import run as dataplane_run
from cni import serve as cni_serve
from daemon import config as c
from daemon import config_cli
from lab import main as lab

# Spellings that were once used for an agent option (or clash with one): no visible option may use them.
OLD = {"--etcd", "--node", "--timeout", "--resync", "--backend", "--socket"}


def _lab_run() -> argparse.ArgumentParser:
    sub = next(a for a in lab.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["run"]


OLD_RUN = {
    "--etcd": "--etcd-endpoints",
    "--node": "--node-name",
    "--resync": "--sync-period",
    "--backend": "--iptables-backend",
}
ETCD = {"etcd_ca_file", "etcd_cert_file", "etcd_key_file", "etcd_timeout"}
# CLI -> (its parser, the agent options it takes, its deprecated spellings -> the spelling that replaced them)
ARGPARSE: dict[str, tuple[Callable[[], argparse.ArgumentParser], set[str], dict[str, str]]] = {
    "podnet-cni serve": (cni_serve.build_parser, {"cni_socket", "log_level", *ETCD}, {"--socket": "--cni-socket"}),
    "python -m agent.dataplane.run": (
        dataplane_run.build_parser,
        {"etcd_endpoints", "node_name", "sync_period", "iptables_backend", "netns", *ETCD},
        OLD_RUN,
    ),
    "podnet-lab run": (_lab_run, set(), {"--timeout": "--phase-timeout"}),
    "podnet-agent": (config_cli.build_parser, {o.name for o in c.OPTIONS}, {}),
}
AGENTCTL_OPTIONS = {"etcd_endpoints", "etcd_ca_file", "etcd_cert_file", "etcd_key_file", "node_name", "etcd_timeout"}
AGENTCTL_OLD = {"--node": "--node-name", "--timeout": "--etcd-timeout"}
SAMPLE = {  # a value of each agent option to set through its variable (differs from every default)
    "etcd_endpoints": "10.0.0.9:2379", "etcd_ca_file": "/tls/ca.pem", "etcd_cert_file": "/tls/c.pem",
    "etcd_key_file": "/tls/c.key", "etcd_timeout": "7s", "node_name": "node-x", "sync_period": "2m",
    "iptables_backend": "nft", "netns": "ns-x", "log_level": "debug", "cni_socket": "/run/x/cni.sock",
}  # fmt: skip


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings if s.startswith("--")}


@pytest.mark.parametrize("cli", sorted(ARGPARSE))
def test_agent_options_have_the_agents_flag_and_variable(cli: str, monkeypatch: pytest.MonkeyPatch) -> None:
    build, names, _ = ARGPARSE[cli]
    for name in sorted(names):
        option = c.BY_NAME[name]
        for variable in (o.env for o in c.OPTIONS):
            monkeypatch.delenv(variable, raising=False)
        flags = _flags(build())
        assert option.flag in flags, f"{cli}: no {option.flag}"
        action = flags[option.flag]
        assert action.dest == option.name
        if cli == "podnet-agent":
            continue  # the agent itself resolves variables in daemon.config (tested there)
        assert f"[env {option.env}]" in (action.help or ""), f"{cli} {option.flag}: help does not name {option.env}"
        unset = getattr(build().parse_args([]), name)
        via_flag = getattr(build().parse_args([option.flag, SAMPLE[name]]), name)
        monkeypatch.setenv(option.env, SAMPLE[name])
        from_env = getattr(build().parse_args([]), name)
        assert from_env == via_flag != unset, f"{cli}: {option.env}={SAMPLE[name]} read as {from_env!r}"
        monkeypatch.delenv(option.env)


@pytest.mark.parametrize("cli", sorted(ARGPARSE))
def test_every_option_has_help_and_no_old_spelling_is_visible(cli: str) -> None:
    build, _, old = ARGPARSE[cli]
    parser = build()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        visible = action.help != argparse.SUPPRESS
        for flag in action.option_strings:
            if flag in old:
                assert not visible, f"{cli}: the old {flag} is listed in --help"
            else:
                assert visible and (action.help or "").strip(), f"{cli}: {flag} has no help"
                assert flag not in OLD, f"{cli}: {flag} is an old spelling"


@pytest.mark.parametrize("cli", sorted(k for k, v in ARGPARSE.items() if v[2]))
def test_old_spellings_still_work_with_one_warning(cli: str, capsys: pytest.CaptureFixture[str]) -> None:
    build, _, old = ARGPARSE[cli]
    for old_flag, new_flag in old.items():
        parser = build()
        flags = _flags(parser)
        value = "3s" if "timeout" in new_flag or "period" in new_flag else "nft" if "backend" in new_flag else "x"
        if new_flag == "--phase-timeout":
            value = "3"
        assert flags[old_flag].dest == flags[new_flag].dest
        expect = getattr(parser.parse_args([new_flag, value]), flags[new_flag].dest)
        capsys.readouterr()
        got = parser.parse_args([old_flag, value, old_flag, value])  # given twice: still one warning
        assert getattr(got, flags[new_flag].dest) == expect
        err = capsys.readouterr().err
        assert err.count(f"{old_flag} is deprecated, use {new_flag}") == 1, err


# -- agentctl (click) --------------------------------------------------------------------------------------------


def _options(command: click.Command, path: str = "agentctl") -> Iterator[tuple[str, click.Option]]:
    for param in command.params:
        if isinstance(param, click.Option):
            yield path, param
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _options(sub, f"{path} {name}")


def test_agentctl_takes_the_agents_spellings() -> None:
    top = {p.name: p for p in agentctl.cli.params if isinstance(p, click.Option)}
    for name in sorted(AGENTCTL_OPTIONS):
        option = c.BY_NAME[name]
        param = top.get(name)
        assert param is not None and option.flag in param.opts, f"agentctl: no {option.flag}"
        assert param.envvar == option.env and param.show_envvar
    for path, param in _options(agentctl.cli):
        if param.hidden:
            assert path == "agentctl" and set(param.opts) <= set(AGENTCTL_OLD), (path, param.opts)
            continue
        assert (param.help or "").strip(), f"{path}: {param.opts} has no help"
        if path == "agentctl":
            assert not set(param.opts) & OLD, f"agentctl: {param.opts} is an old spelling"


def _ctl(args: list[str]) -> CtlContext:
    ctx = agentctl.cli.make_context("agentctl", [*args, "version"])
    with ctx:
        ctx.invoke(agentctl.cli.callback or (lambda: None), **ctx.params)
        assert isinstance(ctx.obj, CtlContext)
        return ctx.obj


def test_agentctl_old_spellings_work_with_one_warning(capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    ctl = _ctl(["--node", "n7", "--timeout", "250ms"])
    assert (ctl.node, ctl.timeout) == ("n7", 0.25)
    warnings = [
        "agentctl: --node is deprecated, use --node-name",
        "agentctl: --timeout is deprecated, use --etcd-timeout",
    ]
    assert capsys.readouterr().err.splitlines() == warnings
    ctl = _ctl(["--node-name", "new", "--node", "old", "--etcd-timeout", "2", "--timeout", "9"])
    assert (ctl.node, ctl.timeout) == ("new", 2.0)  # the current spelling wins
    assert capsys.readouterr().err.splitlines() == warnings
    assert _ctl(["--node-name", "n1", "--etcd-timeout", "1m"]).timeout == 60.0
    assert capsys.readouterr().err == ""


def test_agentctl_reads_the_agents_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _ctl([]).timeout == 5.0
    monkeypatch.setenv("PODNET_NODE_NAME", "from-env")
    monkeypatch.setenv("PODNET_ETCD_TIMEOUT", "3s")
    monkeypatch.setenv("PODNET_ETCD_ENDPOINTS", "127.0.0.1:1,127.0.0.2:2")
    ctl = _ctl([])
    assert (ctl.node, ctl.timeout, ctl.endpoints) == ("from-env", 3.0, ["127.0.0.1:1", "127.0.0.2:2"])
    assert _ctl(["--node", "flag"]).node == "flag"  # a flag, even the old spelling, over the variable
    res = CliRunner().invoke(agentctl.cli, ["--help"])
    assert "[env var: PODNET_ETCD_TIMEOUT" in res.output and "--timeout" not in res.output
