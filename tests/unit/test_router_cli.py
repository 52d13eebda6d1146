"""The node runner's configuration: the speaker's bridge timeout is the runner's to set, with the same default,
and a bad value on the command line is refused with a clear message before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.node_runner import RunnerConfig, main


def test_bridge_timeout_default_and_validation(tmp_path: Path) -> None:
    assert RunnerConfig("n1", tmp_path).bridge_timeout == 15.0
    assert RunnerConfig("n1", tmp_path, bridge_timeout=120.0).bridge_timeout == 120.0
    with pytest.raises(ValueError, match="bridge_timeout"):
        RunnerConfig("n1", tmp_path, bridge_timeout=0)


@pytest.mark.parametrize("bad", ["0", "-3", "soon", "nan"])
def test_bad_bridge_timeout_on_the_command_line_is_refused(
    bad: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--node", "n1", "--workdir", str(tmp_path), f"--bridge-timeout={bad}"])
    assert exc.value.code == 2
    assert "--bridge-timeout" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing started, nothing written


def test_reactor_speed_default_and_bad_value(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert RunnerConfig("n1", tmp_path).exabgp_reactor_speed == 1.0  # ExaBGP's own default: a 10 ms idle poll
    with pytest.raises(SystemExit) as exc:
        main(["--node", "n1", "--workdir", str(tmp_path), "--exabgp-reactor-speed=-1"])
    assert exc.value.code == 2
    assert "--exabgp-reactor-speed" in capsys.readouterr().err
