"""avts_dist/distributed/host.py: the open-files limit raised at start, and one warning line
when the hard limit cannot hold gloo's meshes at the world size (run in a child process whose
limits are lowered first, as a cluster's ulimit would)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

from avts_dist.config import REPO_ROOT
from avts_dist.distributed.host import sockets_needed

CALL = (
    "import logging, resource, sys; logging.basicConfig(format='%(levelname)s %(message)s'); "
    "from avts_dist.distributed.host import raise_open_files_limit; "
    "print(raise_open_files_limit(int(sys.argv[1])), resource.getrlimit(resource.RLIMIT_NOFILE))"
)


def _child(soft: int, hard: int, world_size: int) -> subprocess.CompletedProcess:
    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return subprocess.run(
        [sys.executable, "-c", CALL, str(world_size)], preexec_fn=limits, capture_output=True,
        text=True, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), timeout=120,
    )  # fmt: skip


def test_sockets_needed_counts_two_meshes():
    assert sockets_needed(512) - sockets_needed(1) == 2 * 511
    assert sockets_needed(1) == sockets_needed(0) > 0


def test_the_soft_limit_is_raised_to_the_hard_one():
    hard = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 65536)
    proc = _child(256, hard, world_size=8)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [f"({hard},", f"{hard})", f"({hard},", f"{hard})"]
    assert proc.stderr == ""


def test_a_hard_limit_below_the_world_sizes_need_warns_in_one_line():
    proc = _child(256, 1024, world_size=512)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[:2] == ["(1024,", "1024)"]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"WARNING open-files hard limit 1024 is below the {sockets_needed(512)} a rank of 512 needs"
    ), lines
