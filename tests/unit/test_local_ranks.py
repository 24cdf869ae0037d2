"""``spawn_local_ranks`` (``avts train --nproc N``): its exit status, and which rank failed how,
with ranks exec'd (fresh interpreters) or forked from the launcher."""

from __future__ import annotations

import subprocess
import sys

import pytest

from avts_dist.config import REPO_ROOT
from avts_dist.distributed.launcher import rank_start_method, spawn_local_ranks

RANK = [sys.executable, "-m", "tests.fixtures.rank_does"]
# The launcher runs in a process of its own: a forked rank is a copy of its launcher, and a copy
# of pytest's process would be another test than the one meant here.
LAUNCH = (
    "import sys; from avts_dist.distributed.launcher import spawn_local_ranks; "
    "sys.exit(spawn_local_ranks({cmd!r}, 3, ok_codes={ok!r}, start={start!r}))"
)


def _run(start: str, capfd, killed_rank: int, other_code: int, ok=(0,)) -> tuple[int, str]:
    cmd = [*RANK, str(killed_rank), str(other_code)]
    if start == "exec":  # the launcher in this process: its ranks are fresh interpreters
        capfd.readouterr()
        code = spawn_local_ranks(cmd, 3, ok_codes=ok, start="exec")
        return code, capfd.readouterr().err
    launcher = LAUNCH.format(cmd=cmd, ok=ok, start=start)
    proc = subprocess.run(
        [sys.executable, "-c", launcher], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("start", ["exec", "fork"])
def test_a_rank_killed_by_a_signal_fails_the_run_and_is_named(start, capfd):
    code, err = _run(start, capfd, killed_rank=2, other_code=0)
    assert code == 1
    assert "avts: rank 2 was killed by SIGTERM" in err, err
    assert "rank 0 was" not in err and "rank 1 was" not in err
    # The ranks that exited ran their exit handlers, forked ones too; the killed one did not.
    assert "rank 0 ran its exit handlers" in err and "rank 1 ran its exit handlers" in err
    assert "rank 2 ran" not in err


@pytest.mark.parametrize("start", ["exec", "fork"])
def test_every_failed_rank_is_named_with_its_code(start, capfd):
    code, err = _run(start, capfd, killed_rank=-1, other_code=3)
    assert code == 1
    assert "avts: rank 1 exited 3; rank 2 exited 3" in err, err


@pytest.mark.parametrize("start", ["exec", "fork"])
def test_ok_codes_other_than_zero_are_returned_and_nothing_is_said(start, capfd):
    code, err = _run(start, capfd, killed_rank=-1, other_code=75, ok=(0, 75))
    assert code == 75 and "avts:" not in err, err
    code, err = _run(start, capfd, killed_rank=-1, other_code=0)
    assert code == 0 and "avts:" not in err, err


def test_a_forked_rank_runs_a_module_only():
    with pytest.raises(ValueError, match="python -m MODULE"):
        spawn_local_ranks([sys.executable, "-c", "pass"], 2, start="fork")
    with pytest.raises(ValueError, match="start='spawn'"):
        spawn_local_ranks(RANK, 2, start="spawn")


def test_the_start_method_is_fork_on_cpu_exec_with_cuda_or_as_asked():
    import torch

    assert rank_start_method({}) == ("exec" if torch.cuda.is_available() else "fork")
    assert rank_start_method({"AVTS_RANK_START": "exec"}) == "exec"
    assert rank_start_method({"AVTS_RANK_START": "fork"}) == "fork"
    with pytest.raises(ValueError, match="AVTS_RANK_START='spawn'"):
        rank_start_method({"AVTS_RANK_START": "spawn"})
