"""The ``veritas-resilience`` command line: help, version, and the demo's backend check."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

import veritas_resilience
from veritas_resilience import cli


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints the program name and version, and exits 0."""
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"veritas-resilience {veritas_resilience.__version__}\n"


COMMANDS = ["demo", "rules", "serve", "drill", "proxy"]


@pytest.mark.parametrize("argv", [["--help"], *([c, "--help"] for c in COMMANDS)])
def test_help_is_plain_text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """--help shows the commands in plain text, without reST markup such as ``literal``."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and ":class:" not in text and ":meth:" not in text
    assert all(command in text for command in (COMMANDS if argv == ["--help"] else argv[:1]))


def test_every_command_dispatches_one_way() -> None:
    """Each subcommand sets the function that runs it; main() has no per-command branches."""
    parser = cli._parser()
    for command in COMMANDS:
        args = parser.parse_args([command])
        assert callable(args.run), command


def test_demo_on_trio_without_trio_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without trio installed, --backend trio exits 2 with an install hint, not a traceback."""
    find_spec = importlib.util.find_spec

    def without_trio(name: str, *args: Any) -> Any:
        return None if name == "trio" else find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_trio)
    assert cli.main(["demo", "--backend", "trio"]) == 2
    assert "pip install 'veritas-resilience[trio]'" in capsys.readouterr().err


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a command, the usage is printed and the exit status is 2."""
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2
    assert "usage: veritas-resilience" in capsys.readouterr().err
