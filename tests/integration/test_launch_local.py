"""`avts launch --cluster local`: submitit's local executor runs the job's tasks as processes on
this machine (no SLURM), here 2 tasks joined by torch.distributed gloo."""

from __future__ import annotations

import json

import pytest

from avts_dist.cli import main as avts_main

pytestmark = pytest.mark.slow


def test_local_cluster_runs_two_tasks(tmp_path, monkeypatch):
    monkeypatch.setenv("AVTS_TOY_STEP_S", "0.0")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run:\n  name: loc\n  dir: {tmp_path / 'loc'}\ntrain:\n  max_steps: 5\n")
    status = avts_main(
        ["launch", "pretrain", "--config", str(cfg), "--cluster", "local", "--tasks-per-node", "2"]
        + ["--trainer", "tests.fixtures.slurm:toy_run_training", "--time", "5", "--wait"]
    )
    assert status == 0
    ckpt = tmp_path / "loc" / "checkpoints" / "step_000005"
    assert sorted(p.name for p in ckpt.iterdir()) == ["COMPLETE", "rank0.json", "rank1.json"]
    # w <- w - 0.05 * mean gradient of (w - 1)^2 and (w - 2)^2: after 5 steps from 0 it is
    # 1.5 (1 - 0.9^5) only when both ranks averaged (a lone rank would reach 1 - 0.9^5).
    shards = [json.loads((ckpt / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert shards[0]["w"] == shards[1]["w"] == pytest.approx(1.5 * (1 - 0.9**5))
