"""The real trainer (`avts train`, 2 gloo processes) with gradient accumulation: the global
batch's negatives (the embedding cache) and micro-batch negatives both train, the logged loss is
the whole batch's, and a NaN loss skips exactly its step (``tests/fixtures/train_hooks.py``)."""

from __future__ import annotations

import math

import pytest

from tests.integration.test_train import _config, _ok, avts_train, metrics, train_corpus  # noqa: F401

pytestmark = pytest.mark.slow

COMMON = ("data.global_batch_size=8", "deepspeed.grad_accum_steps=2", "train.max_steps=4")
COMMON += ("train.val_every_steps=0", "checkpoint.every_steps=0", "tracking.enabled=false")


@pytest.mark.parametrize("scope", ["global", "micro"])
def test_trainer_accumulates_with_either_negatives_scope(tmp_path, train_corpus, scope):  # noqa: F811
    cfg = _config(tmp_path, train_corpus)
    proc = avts_train(
        tmp_path, cfg, f"run.name={scope}", f"loss.negatives_scope={scope}", *COMMON, nproc=2,
        hooks=("--nan-at", "3"),
    )  # fmt: skip
    _ok(proc)
    lines = metrics(tmp_path / "runs" / scope)
    assert sorted(lines) == [1, 2, 3, 4]
    assert lines[3].get("skipped_step") is True and lines[3]["num_skipped_steps"] == 1
    for step in (1, 2, 4):
        assert not lines[step].get("skipped_step"), lines[step]
        assert math.isfinite(lines[step]["loss"]), lines[step]
