"""One host sync per optimizer step: the real ``avts train`` (one rank, gloo) with every host
read of a tensor counted during steps 2-5 (tests/gpu/trainer_stage.py; on a GPU the GPU check
counts them with CUDA's own sync debug mode). A sync added to the step fails this test."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

from avts_dist.config import REPO_ROOT

QUICKSTART = REPO_ROOT / "configs" / "pretrain" / "quickstart.yaml"


def test_one_host_sync_per_step_plus_the_log_steps(tmp_path, synth_corpus):
    out = tmp_path / "syncs.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.gpu.trainer_stage", "--syncs-out", str(out),
         "--count-from", "2", "--count-to", "6", "--config", str(QUICKSTART),
         f"data.url={synth_corpus}", f"run.dir={tmp_path / 'run'}", "tracking.enabled=false",
         "data.global_batch_size=4", "data.num_workers=1", "train.max_steps=6",
         "train.log_every=4", "train.val_every_steps=0", "train.progress=false",
         "checkpoint.every_steps=0"],
        cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1"),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "cpu" and report["window_closed"] and report["num_steps"] == 4
    ours = collections.Counter()
    for where, n in report["by_caller"].items():
        if where.startswith("avts_dist/"):
            ours[where.split(" ")[-1]] += n  # the function: line numbers move with edits
    # Steps 2-5: each agrees on its health flags once (the all-reduce read on the host); step 4
    # is a log step, which reads its loss terms and losses once each.
    assert ours == {"agree_on_flags": 4, "reduce_metrics": 1, "flush": 1}, report["by_caller"]
    # The counter sees the libraries' syncs too (DeepSpeed's gradient-norm check).
    assert any(w.startswith("deepspeed/") for w in report["by_caller"]), report["by_caller"]
