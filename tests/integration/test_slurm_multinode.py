"""A 2-node job on two SLURM nodes in separate network namespaces (launch/local_slurm.sh mn-up).

Each slurmd lives in its own network namespace (n1: 10.77.0.1, n2: 10.77.0.2) joined by one
veth pair, so the job's gloo traffic can only cross that interface: the namespaces share no
loopback. The stand-in trainer all-reduces every step; it records where each rank ran.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.fixtures.slurm import LOCAL_SLURM

REPO = LOCAL_SLURM.parent.parent

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def two_node_cluster():
    if os.geteuid() != 0:
        pytest.skip("the two-node SLURM cluster needs root (network namespaces, daemons)")
    was_up = (
        subprocess.run(
            ["bash", str(LOCAL_SLURM), "mn-status"], capture_output=True, timeout=30
        ).returncode
        == 0
    )
    out = subprocess.run(
        ["bash", str(LOCAL_SLURM), "mn-up"], capture_output=True, text=True, timeout=600
    )
    if out.returncode != 0:
        pytest.skip(f"two-node SLURM cluster could not start: {out.stderr.strip()[-500:]}")
    yield
    if not was_up:
        subprocess.run(["bash", str(LOCAL_SLURM), "mn-down"], capture_output=True, timeout=120)


def test_two_node_job_crosses_the_veth(two_node_cluster, tmp_path):
    cfg = tmp_path / "mn.yaml"
    cfg.write_text(f"run:\n  name: mn\n  dir: {tmp_path / 'mn'}\ntrain:\n  max_steps: 30\n")
    env = dict(os.environ, AVTS_TOY_STEP_S="0.02", OMP_NUM_THREADS="1")
    env.pop("SLURM_CONF", None)
    avts = [str(REPO / ".venv" / "bin" / "python"), "-m", "avts_dist"]
    out = subprocess.run(
        ["bash", str(LOCAL_SLURM), "mn-exec", *avts, "launch", "pretrain"]
        + ["--config", str(cfg), "--profile", "local_multinode", "--wait", "--json"]
        + ["--trainer", "tests.fixtures.slurm:toy_run_training"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(info["states"].values()) == {"COMPLETED"}
    ckpt = tmp_path / "mn" / "checkpoints" / "step_000030"
    shards = [json.loads((ckpt / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["node"] for s in shards] == ["n1", "n2"]
    # MASTER_ADDR is n1's NodeAddr (node names need not resolve), reached over the veth.
    assert {s["master_addr"] for s in shards} == {"10.77.0.1"}
    # Identical weights on both nodes: the all-reduce worked across them (w -> 1.5 needs both).
    assert shards[0]["w"] == shards[1]["w"] == pytest.approx(1.5 * (1 - 0.9**30), rel=1e-9)
