"""launch/local_slurm.sh itself: idempotent `up`, a truthful `status`, the CLI wrapper, and
daemons that keep nothing of their caller (no descriptor, no session)."""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
from pathlib import Path

import pytest

from avts_dist.cli import main as avts_main
from tests.fixtures.slurm import LOCAL_SLURM, MN, STATE

pytestmark = pytest.mark.slurm


def _started() -> dict[str, str]:
    return {p.name: p.read_text().strip() for p in (STATE / "pids").glob("*.started")}


def test_up_is_idempotent_and_status_reports(slurm_cluster, capfd):
    before = _started()
    assert {"slurmctld.started", "slurmd.started"} <= set(before)
    out = subprocess.run(["bash", str(LOCAL_SLURM), "up"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert _started() == before, "a second `up` must not start new daemons"
    status = subprocess.run(["bash", str(LOCAL_SLURM), "status"], capture_output=True, text=True)
    assert status.returncode == 0
    assert f"slurmctld: running (pid {before['slurmctld.started']})" in status.stdout
    assert "debug" in status.stdout and "idle" in status.stdout
    conf = (STATE / "slurm.conf").read_text()
    # Written for this machine: its CPU count, no accounting daemon, no cgroups.
    cpus = subprocess.run(["nproc", "--all"], capture_output=True, text=True).stdout.strip()
    assert f"CPUs={cpus}" in conf and "JobAcctGatherType=jobacct_gather/none" in conf
    capfd.readouterr()
    assert avts_main(["launch", "cluster", "status"]) == 0
    assert "slurmd: running" in capfd.readouterr().out


def _open_files(pid: str) -> set[str]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            out.add(os.readlink(fd))
    return out


def _cluster_answers(status: str) -> bool:
    return subprocess.run(["bash", str(LOCAL_SLURM), status], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize(("up", "down", "state"), [("up", "down", STATE), ("mn-up", "mn-down", MN)])
def test_daemons_hold_nothing_of_their_caller(slurm_cluster, tmp_path, up, down, state):
    """A caller holding a lock and a pipe's write end (descriptors every child inherits) runs
    `down` then `up`, so the daemons really start under it. Once it exits, the lock must be
    free and the pipe at EOF: no daemon kept either, and none runs in the caller's session."""
    mn_was_up = up != "mn-up" or _cluster_answers("mn-status")
    # `down` stops munged only if `up` started it (a system munged stays as it is).
    munged_is_ours = up == "up" and (state / "pids" / "munged.started").is_file()
    lock = tmp_path / "caller.lock"
    read_end, write_end = os.pipe()
    caller = (
        f'exec 9>"{lock}"; flock -n 9 || exit 3; '
        f'bash "{LOCAL_SLURM}" {down} && bash "{LOCAL_SLURM}" {up}'
    )
    try:
        # capture_output also reads stdout and stderr to EOF, as a CI runner does.
        out = subprocess.run(
            ["bash", "-c", caller],
            capture_output=True,
            text=True,
            timeout=300,
            pass_fds=(write_end,),
        )
        os.close(write_end)
        write_end = -1
        assert out.returncode == 0, out.stderr[-2000:]
        readable, _, _ = select.select([read_end], [], [], 5.0)
        assert readable and os.read(read_end, 1) == b"", "a daemon holds the caller's pipe"
        # flock -n fails at once while anyone holds the lock.
        assert subprocess.run(["flock", "-n", str(lock), "true"]).returncode == 0, (
            "a daemon holds the caller's lock"
        )
        started = {p.name: p.read_text().strip() for p in (state / "pids").glob("*.started")}
        daemons = {k: v for k, v in started.items() if v.isdigit()}
        assert "slurmctld.started" in daemons
        if munged_is_ours:
            assert "munged.started" in daemons  # `down` stopped ours, `up` started it again
        for name, pid in daemons.items():
            assert str(lock) not in _open_files(pid), f"{name} holds the caller's lock"
            assert os.getsid(int(pid)) != os.getsid(0), f"{name} runs in the caller's session"
    finally:
        if write_end >= 0:
            os.close(write_end)
        os.close(read_end)
        # Leave the clusters as the other tests expect them: the single-node one up, the
        # two-node one as it was.
        if up == "up":
            subprocess.run(["bash", str(LOCAL_SLURM), "up"], capture_output=True, timeout=300)
        elif not mn_was_up:
            subprocess.run(["bash", str(LOCAL_SLURM), "mn-down"], capture_output=True, timeout=300)
