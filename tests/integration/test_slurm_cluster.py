"""launch/local_slurm.sh itself: idempotent `up`, a truthful `status`, the CLI wrapper."""

from __future__ import annotations

import subprocess

import pytest

from avts_dist.cli import main as avts_main
from tests.fixtures.slurm import LOCAL_SLURM, STATE

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
