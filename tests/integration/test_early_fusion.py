"""model.arch=early_fusion through the real `avts train` CLI: 2 DeepSpeed gloo processes on a real
MP4 corpus, the same curriculum and negatives as two-stream, validation, checkpoints, and a
resume that continues bitwise like the uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "pretrain" / "quickstart.yaml"

pytestmark = pytest.mark.slow


def _train(cwd: Path, corpus: str, *overrides: str) -> subprocess.CompletedProcess:
    config = cwd / "early_fusion.yaml"
    config.write_text(
        f"base: {QUICKSTART}\n"
        "model: {arch: early_fusion}\n"
        f"data: {{url: {corpus}, global_batch_size: 4, num_workers: 0}}\n"
        "curriculum:\n"
        "  stages:\n"
        "    - {name: easy, negative_mix: {easy: 1.0}, until_step: 4}\n"
        "    - {name: easy_hard, negative_mix: {easy: 0.5, hard: 0.5}}\n"
        "train: {max_steps: 8, log_every: 1, val_every_steps: 4, val_batches: 1, progress: false}\n"
        "checkpoint: {every_steps: 2, keep_last: 4}\n"
        "optim: {warmup_steps: 2}\n"
        "tracking: {enabled: false}\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "avts_dist", "train", "--config", str(config), "--nproc", "2"]
    proc = subprocess.run(
        [*cmd, *overrides], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _metrics(run_dir: Path) -> dict[int, dict]:
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {ln["step"]: ln for ln in lines}


def test_early_fusion_trains_on_the_sync_objective_and_resumes_exactly(
    train_corpus_shared, tmp_path
):
    corpus = train_corpus_shared
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    _train(ref_dir, corpus, "run.name=ef")
    run = ref_dir / "runs" / "ef"
    ref = _metrics(run)
    assert sorted(ref) == list(range(1, 9))
    # BCE-only terms: no embedding distances; the loader's hard negatives arrive at step 5.
    assert "train/dist/pos" not in ref[1] and ref[1]["train/loss/head"] > 0
    assert ref[4]["train/loss/hard"] == 0.0 and ref[8]["train/loss/hard"] > 0.0
    assert ref[4]["curriculum"][0]["to_stage"] == "easy_hard"
    assert 0.0 <= ref[4]["val/sync_acc_easy"] <= 1.0 and "val/sync_acc_hard" in ref[8]
    meta = json.loads((run / "checkpoints" / "step_000008" / "COMPLETE").read_text())
    assert meta["world_size"] == 2

    # Resume from step 4 in a copy whose later checkpoints are gone: steps 5-8 come out bitwise.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(ref_dir, resumed_dir)
    ckpts = resumed_dir / "runs" / "ef" / "checkpoints"
    for tag in ("step_000006", "step_000008"):
        shutil.rmtree(ckpts / tag)
    _train(resumed_dir, corpus, "run.name=ef", "resume=auto")
    got = _metrics(resumed_dir / "runs" / "ef")
    assert sorted(got) == list(range(1, 9))
    for step in range(5, 9):
        assert got[step]["loss"] == ref[step]["loss"], f"step {step}"
        assert got[step]["train/acc/pos"] == ref[step]["train/acc/pos"], f"step {step}"
    assert got[8]["val/sync_acc_hard"] == ref[8]["val/sync_acc_hard"]

    # The export rebuilds the architecture the run trained, weights equal to the checkpoint's.
    from avts_dist.cli import main
    from avts_dist.export import load_pretrained

    out = tmp_path / "ef.pt"
    assert main(["export", "--checkpoint", str(run / "checkpoints"), "--out", str(out)]) == 0
    model = load_pretrained(str(out), part="model")
    assert type(model).__name__ == "EarlyFusionModel"
    payload = torch.load(out, weights_only=True)
    assert payload["step"] == 8 and payload["model_config"]["arch"] == "early_fusion"

    # avts eval sync scores pairs with the early-fusion sync head (a traceback before).
    eval_dir = tmp_path / "sync"
    args = ["eval", "sync", "--checkpoint", str(run / "checkpoints"), "--json"]
    overrides = [f"data.url={corpus}", f"eval.out_dir={eval_dir}", "tracking.enabled=false"]
    assert main([*args, *overrides, "eval.sync.max_clips=8"]) == 0
    sync = json.loads((eval_dir / "sync" / "metrics.json").read_text())["metrics"]
    assert 0.0 <= sync["acc_easy"] <= 1.0 and sync["num_easy"] > 0
    # Offset classification scores 21 shifts per clip with the same head (4 s clips: room).
    assert sync["num_offset_classes"] == 21 and sync["num_offset_clips"] > 0
    assert 0.0 <= sync["offset_acc"] <= sync["offset_acc_within1"] <= 1.0
