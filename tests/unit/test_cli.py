"""The single `avts` entry point: every subcommand has --help, user errors are one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from avts_dist.cli import SUBCOMMANDS, main


def _avts(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "avts_dist", *args], capture_output=True, text=True, timeout=120
    )


def test_top_level_help_lists_every_subcommand():
    out = _avts("--help")
    assert out.returncode == 0
    for name in ("synth", "prepare", "inspect", "train", "eval", "export", "compare", "launch"):
        assert name in out.stdout


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as info:
        main([name, "--help"])
    assert info.value.code == 0
    assert "usage: avts" in capsys.readouterr().out


def test_bad_storage_options_json_is_a_clear_error():
    out = _avts("inspect", "data/x", "--storage-options", "{not json")
    assert out.returncode == 2
    assert "--storage-options" in out.stderr
    assert "Traceback" not in out.stderr
