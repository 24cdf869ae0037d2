"""The GPU check (``make gpu-check``). On a GPU machine it runs for real; on CPU the real run is
skipped with its reason, and a dry run (toy sizes, every code path) keeps the script working."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
NO_GPU = "skipped: no GPU (CUDA is not available here); the GPU check measures nothing on CPU"


def gpu_check(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "tests.gpu.gpu_check", *args], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
@pytest.mark.slow
def test_gpu_check_on_the_gpu(tmp_path):  # pragma: no cover - GPU machines
    proc = gpu_check("--out", str(tmp_path / "gpu.json"), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["conv3d_agreement"]["pass"] and report["trainer"]["pass"]
    assert len(report["nets"]) == 12 and all(r["mfu"] > 0 for r in report["nets"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the real check runs")
def test_without_a_gpu_it_measures_nothing_and_says_so(tmp_path):
    proc = gpu_check("--out", str(tmp_path / "gpu.json"))
    assert proc.returncode == 3
    assert "skipped: no GPU" in proc.stderr and "nothing was measured" in proc.stderr
    assert not (tmp_path / "gpu.json").exists()


@pytest.mark.slow
def test_dry_run_exercises_every_stage(tmp_path):
    proc = gpu_check("--device", "cpu", "--dry-run", "--out", str(tmp_path / "dry.json"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "dry.json").read_text())
    assert report["dry_run"] is True and report["skipped"] == {}
    assert report["peak_bf16_flops"] > 0
    combos = {(r["arch"], r["dtype"], r["layout"]) for r in report["nets"]}
    assert len(combos) == 12  # 3 nets x {fp32, bf16} x {contiguous, channels_last_3d}
    assert all(r["clips_per_s"] > 0 and math.isfinite(r["mfu"]) for r in report["nets"])
    conv = report["conv3d_agreement"]
    assert conv["pass"] and conv["num_shapes"] > 3 and 0 < conv["max_rel_err_bf16"] < 0.02
    trainer = report["trainer"]
    assert trainer["train_returncode"] == 0 and trainer["resume_returncode"] == 0
    assert trainer["accumulate_returncode"] == 0  # deepspeed.grad_accum_steps=2, global negatives
    assert trainer["pass"] and trainer["resumed_steps"] == [4, 5, 6, 7, 8]
    assert 0 <= trainer["data_wait_fraction"] <= 1 and trainer["clips_per_s"] > 0
