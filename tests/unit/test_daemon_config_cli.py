"""The configuration's command line: one flag per option (kept as given, parsed like every other source), which
config file is read, and ``load`` from flags, the environment and that file."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon import config as c
from daemon.config_cli import build_parser, config_file, flags_of, load


def parse(*argv: str) -> tuple[dict[str, object], str | None]:
    return flags_of(build_parser().parse_args(list(argv)))


def test_flags_given_are_the_only_flags() -> None:
    assert parse() == ({}, None)
    flags, path = parse(
        "--sync-period", "2m", "--no-run-cni", "--run-router", "--etcd-endpoints=a:1,b:2", "--config", "/c.yaml"
    )
    assert flags == {"sync_period": "2m", "run_cni": False, "run_router": True, "etcd_endpoints": "a:1,b:2"}
    assert path == "/c.yaml"


def test_a_bad_flag_value_names_the_flag() -> None:
    flags, _ = parse("--sync-period", "soon")
    with pytest.raises(c.ConfigError, match=r"^flag --sync-period: 'soon' is not a duration"):
        c.resolve(flags, {}, None, hostname="n1")


def test_every_option_has_a_flag_with_its_spellings_in_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for option in c.OPTIONS:
        assert f"{option.flag} " in out or f"{option.flag}," in out
        assert f"env {option.env}; file key {option.key}; default: {c.default_text(option)}]" in out
    assert "--no-run-firewall" in out and "--config PATH" in out


def test_which_config_file() -> None:
    assert config_file("/a.yaml", {"PODNET_CONFIG": "/b.yaml"}) == ("/a.yaml", True)
    assert config_file(None, {"PODNET_CONFIG": "/b.yaml"}) == ("/b.yaml", True)
    assert config_file(None, {"PODNET_CONFIG": ""}) == (c.DEFAULT_CONFIG_FILE, False)


def test_load_reads_the_file_and_names_it(tmp_path: Path) -> None:
    conf = tmp_path / "agent.yaml"
    conf.write_text("syncPeriod: 2m\nlogLevel: debug\nrunFirewall: false\n")
    ns = build_parser().parse_args(["--config", str(conf), "--log-level", "warning"])
    got = load(ns, {"PODNET_SYNC_PERIOD": "3m", "NODE_NAME": "n1"}, hostname="ignored")
    assert (got.config.node_name, got.config.sync_period, got.config.log_level) == ("n1", 180.0, "warning")
    assert got.config.run_firewall is False and str(got.sources["run_firewall"]) == f"config file {conf}"
    # SIGHUP: read again, the file's new values count.
    conf.write_text("logLevel: debug\nrunFirewall: true\n")
    again = load(build_parser().parse_args(["--config", str(conf)]), {"NODE_NAME": "n1"})
    assert (again.config.log_level, again.config.run_firewall) == ("debug", True)
    conf.write_text("syncPeriod: [\n")
    with pytest.raises(c.ConfigError, match=rf"^config file {conf}: not valid YAML"):
        load(ns, {"NODE_NAME": "n1"})


def test_a_missing_config_file_is_an_error_only_when_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(c.ConfigError, match=rf"^config file {missing}: no such file$"):
        load(build_parser().parse_args(["--config", missing]), {"NODE_NAME": "n1"})
    with pytest.raises(c.ConfigError, match=rf"^config file {missing}: no such file$"):
        load(build_parser().parse_args([]), {"NODE_NAME": "n1", "PODNET_CONFIG": missing})
    monkeypatch.setattr(c, "DEFAULT_CONFIG_FILE", missing)  # the default path: absent is fine
    got = load(build_parser().parse_args([]), {"NODE_NAME": "n1"})
    assert all(s.kind != c.FILE for s in got.sources.values())
