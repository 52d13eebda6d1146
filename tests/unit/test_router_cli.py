"""The router's configuration and command line: the speaker's bridge timeout is the router's to set, with the same
default; a bad value is refused with a clear message before anything starts; the options are spelled as
``podnet-agent`` spells them and the old spellings still work (bench/agent_footprint.py passes ``--node``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.router import cli
from agent.router.cli import build_parser, main
from agent.router.config import RouterConfig
from bgp.plan import Defaults


def test_bridge_timeout_default_and_validation(tmp_path: Path) -> None:
    assert RouterConfig("n1", tmp_path).bridge_timeout == 15.0
    assert RouterConfig("n1", tmp_path, bridge_timeout=120.0).bridge_timeout == 120.0
    with pytest.raises(ValueError, match="bridge_timeout"):
        RouterConfig("n1", tmp_path, bridge_timeout=0)


@pytest.mark.parametrize("flag", ["--exabgp-bridge-timeout", "--bridge-timeout"])
@pytest.mark.parametrize("bad", ["0", "-3", "soon", "nan"])
def test_bad_bridge_timeout_on_the_command_line_is_refused(
    flag: str, bad: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--node-name", "n1", "--workdir", str(tmp_path), f"{flag}={bad}"])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing started, nothing written


def test_reactor_speed_default_and_bad_value(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert RouterConfig("n1", tmp_path).exabgp_reactor_speed == 1.0  # ExaBGP's own default: a 10 ms idle poll
    with pytest.raises(SystemExit) as exc:
        main(["--node-name", "n1", "--workdir", str(tmp_path), "--exabgp-reactor-speed=-1"])
    assert exc.value.code == 2
    assert "--exabgp-reactor-speed" in capsys.readouterr().err


def test_the_agents_spellings_and_the_old_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    new = build_parser().parse_args(
        ["--node-name", "n1", "--workdir", str(tmp_path), "--bgp-hold-time", "9", "--bgp-graceful-restart-time",
         "60", "--sync-period", "2m", "--bgp-startup-grace", "5s", "--exabgp-bridge-timeout", "40s",
         "--bgp-withdraw-on-exit"]
    )  # fmt: skip
    assert capsys.readouterr().err == ""
    old = build_parser().parse_args(
        ["--node", "n1", "--workdir", str(tmp_path), "--hold-time", "9", "--graceful-restart-time", "60",
         "--resync", "120", "--startup-grace", "5", "--bridge-timeout", "40", "--withdraw-on-exit"]
    )  # fmt: skip
    assert vars(old) == vars(new)
    assert (new.node_name, new.bgp_hold_time, new.bgp_graceful_restart_time) == ("n1", 9, 60)
    assert (new.sync_period, new.bgp_startup_grace, new.exabgp_bridge_timeout) == (120.0, 5.0, 40.0)
    assert new.bgp_withdraw_on_exit is True
    err = capsys.readouterr().err
    assert "--node is deprecated, use --node-name" in err
    assert "--resync is deprecated, use --sync-period" in err


def test_defaults_are_the_routers(tmp_path: Path) -> None:
    args = build_parser().parse_args(["--node-name", "n1", "--workdir", str(tmp_path)])
    assert (args.bgp_hold_time, args.bgp_graceful_restart_time) == (Defaults.hold_time, Defaults.graceful_restart_time)
    assert (args.sync_period, args.bgp_startup_grace, args.status_ttl) == (10.0, 30.0, 20)
    assert args.bgp_withdraw_on_exit is False
    assert args.etcd_ca_file is None


def test_node_name_and_workdir_are_required(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--workdir", str(tmp_path)], ["--node-name", "n1"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--node-name is required" in err and "--workdir is required" in err


def test_a_tls_certificate_without_its_key_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    with pytest.raises(SystemExit) as exc:
        main(["--node-name", "n1", "--workdir", str(tmp_path), "--etcd-cert-file", str(cert)])
    assert exc.value.code == 2
    assert "key" in capsys.readouterr().err
