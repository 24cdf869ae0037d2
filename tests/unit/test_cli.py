"""The single `avts` entry point: every subcommand has --help, user errors are one line."""

from __future__ import annotations

import subprocess

import pytest

from avts_dist.cli import SUBCOMMANDS, main
from avts_dist.config import REPO_ROOT
from tests.fixtures.in_process import avts


def _avts(*args: str) -> subprocess.CompletedProcess:
    return avts(list(args))  # in this interpreter, output captured as a process's would be


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


def test_trailing_overrides_join_the_positionals():
    import argparse

    from avts_dist.cli import accept_trailing_overrides

    parser = argparse.ArgumentParser()
    parser.add_argument("job")
    parser.add_argument("--checkpoint")
    parser.add_argument("overrides", nargs="*")
    accept_trailing_overrides(parser)
    args = parser.parse_args(["sync", "a=1", "--checkpoint", "x", "b=2", "c=3"])
    assert (args.job, args.checkpoint, args.overrides) == ("sync", "x", ["a=1", "b=2", "c=3"])
    with pytest.raises(SystemExit):
        parser.parse_args(["sync", "--checkpoint", "x", "stray"])  # not key=value: refused


def test_eval_and_launch_call_libraries_not_the_cli():
    """The package borders: nothing under eval/, launch/ or report/ imports avts_dist.cli,
    reroutes stdout or reads argparse's internals (they call library functions: export, one
    evaluation, the synthetic corpus)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    layers = ("eval", "launch", "report")
    for path in sorted(p for layer in layers for p in root.glob(f"{layer}/**/*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.startswith("avts_dist.cli") for n in names), path
            if isinstance(node, ast.Attribute):
                assert node.attr not in ("redirect_stdout", "_actions"), path


def test_make_tests_two_parts_pass_only_together(monkeypatch):
    from tests.run_suite import exit_status, serial

    assert exit_status({"slurm": 0, "rest": 0}) == 0
    assert exit_status({"slurm": 5, "rest": 0}) == 0  # a selection without SLURM tests
    assert exit_status({"slurm": 0, "rest": 1}) == 1
    assert exit_status({"slurm": 2, "rest": 1}) == 2
    assert exit_status({"slurm": 5, "rest": 5}) == 5  # nothing selected at all
    monkeypatch.delenv("AVTS_TEST_SERIAL", raising=False)
    assert not serial(["tests/unit", "-x"])
    assert serial(["-m", "slow"]) and serial(["-n", "2"]) and serial(["--numprocesses=2"])
    monkeypatch.setenv("AVTS_TEST_SERIAL", "1")
    assert serial([])


def test_each_test_runs_in_one_part_and_cluster_tests_in_the_slurm_part():
    from tests.run_suite import BESIDE_SLURM, part_of

    class Item:  # what part_of reads of a collected pytest item
        def __init__(self, nodeid: str, slurm: bool = False) -> None:
            self.nodeid, self.slurm = nodeid, slurm

        def get_closest_marker(self, name):
            return object() if self.slurm and name == "slurm" else None

    assert part_of(Item("tests/integration/test_slurm_launch.py::t", slurm=True)) == "slurm"
    assert (
        part_of(Item("tests/integration/test_credentials.py::t_slurm_job", slurm=True)) == "slurm"
    )
    assert part_of(Item("tests/integration/test_credentials.py::t_other")) == "rest"
    assert part_of(Item("tests/integration/test_train.py::t")) == "rest"
    assert all(part_of(Item(f"{path}::t")) == "slurm" for path in BESIDE_SLURM)
    assert all((REPO_ROOT / path).is_file() for path in BESIDE_SLURM)
