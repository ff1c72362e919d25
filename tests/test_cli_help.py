"""The command line's help is sized as argparse sizes it, without shutil (see cli.py)."""

from __future__ import annotations

import io
import sys

import pytest

from edgevoice import cli


def _help_lines(capsys: pytest.CaptureFixture[str], *argv: str) -> list[str]:
    with pytest.raises(SystemExit) as exited:
        cli.main([*argv, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out.splitlines()


def test_help_wraps_at_the_width_columns_gives(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("COLUMNS", "42")
    lines = _help_lines(capsys, "relay")
    assert max(map(len, lines)) <= 40
    assert any("--check-config" in line for line in lines)


@pytest.mark.parametrize("columns", ["wide", "-3", "0", ""])
def test_a_nonsense_columns_falls_back_to_80(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str],
                                             columns: str) -> None:
    monkeypatch.setenv("COLUMNS", columns)
    monkeypatch.setattr(sys, "__stdout__", io.StringIO())  # not a terminal either
    assert cli._terminal_columns() == 80
    lines = _help_lines(capsys, "token")
    assert 60 < max(map(len, lines)) <= 78
