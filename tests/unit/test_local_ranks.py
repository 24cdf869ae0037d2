"""``spawn_local_ranks`` (``avts train --nproc N``): its exit status, and which rank failed how."""

from __future__ import annotations

import sys

from avts_dist.distributed.launcher import spawn_local_ranks

# Each rank runs this with its RANK in the environment. The killed rank stands for one that
# aborted at exit; SIGTERM rather than SIGABRT, so that no core file is left behind.
_RANK_DOES = (
    "import os, signal, sys; r = int(os.environ['RANK']); "
    "os.kill(os.getpid(), signal.SIGTERM) if r == int(sys.argv[1]) "
    "else sys.exit(int(sys.argv[2]) if r else 0)"
)


def _run(killed_rank: int, other_code: int, ok=(0,)) -> int:
    cmd = [sys.executable, "-c", _RANK_DOES, str(killed_rank), str(other_code)]
    return spawn_local_ranks(cmd, 3, ok_codes=ok)


def test_a_rank_killed_by_a_signal_fails_the_run_and_is_named(capfd):
    assert _run(killed_rank=2, other_code=0) == 1
    err = capfd.readouterr().err
    assert "avts: rank 2 was killed by SIGTERM" in err, err
    assert "rank 0" not in err and "rank 1" not in err


def test_every_failed_rank_is_named_with_its_code(capfd):
    assert _run(killed_rank=-1, other_code=3) == 1
    err = capfd.readouterr().err
    assert "avts: rank 1 exited 3; rank 2 exited 3" in err, err


def test_ok_codes_other_than_zero_are_returned_and_nothing_is_said(capfd):
    assert _run(killed_rank=-1, other_code=75, ok=(0, 75)) == 75
    assert _run(killed_rank=-1, other_code=0) == 0
    assert "avts:" not in capfd.readouterr().err
