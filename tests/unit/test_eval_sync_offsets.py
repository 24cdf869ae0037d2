"""Offset classification on hand-built scores and clip lengths: every answer below is worked out
by hand, and the windows of each clip must put the audio exactly ``o`` after the video."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eval.sync_offsets import offset_classification, offset_grid, plan_offsets

GRID = [-0.2, -0.1, 0.0, 0.1, 0.2]


def test_offset_grid_is_symmetric_and_scaled():
    assert offset_grid(0.2, 0.1) == GRID
    grid = offset_grid(1.0, 0.1)
    assert len(grid) == 21 and grid[0] == -1.0 and grid[10] == 0.0 and grid[-1] == 1.0


def test_offset_classification_known_answer():
    """Two clips, five classes. Clip 0 is always right. Clip 1 picks: true -0.2 -> -0.1 (one
    class off), -0.1 -> 0.2 (three off), 0.0 -> 0.0, 0.1 -> 0.1, 0.2 -> -0.2 (four off)."""
    scores = torch.zeros(2, 5, 5)
    scores[0] = torch.eye(5)
    for t, g in enumerate([1, 4, 2, 3, 0]):
        scores[1, t, g] = 1.0
    res = offset_classification(scores, GRID)
    # Right: 5 + 2 of 10; within one class: 5 + 3 of 10.
    assert res.metrics["offset_acc"] == pytest.approx(0.7)
    assert res.metrics["offset_acc_within1"] == pytest.approx(0.8)
    assert res.metrics["num_offset_clips"] == 2 and res.metrics["num_offset_classes"] == 5
    assert [r[1] for r in res.by_offset] == pytest.approx([0.5, 0.5, 1.0, 1.0, 0.5])
    assert [r[2] for r in res.by_offset] == pytest.approx([1.0, 0.5, 1.0, 1.0, 0.5])
    assert [r[0] for r in res.by_offset] == GRID and {r[3] for r in res.by_offset} == {2}


def test_a_tie_goes_to_the_first_class_and_constant_scores_are_chance():
    """A scorer that cannot tell offsets apart (all scores equal) always answers the first
    class: right only for that class, 1/5 overall, within one class 2/5."""
    res = offset_classification(torch.zeros(3, 5, 5), GRID)
    assert res.metrics["offset_acc"] == pytest.approx(1 / 5)
    assert res.metrics["offset_acc_within1"] == pytest.approx(2 / 5)


def test_offset_classification_rejects_a_wrong_grid():
    with pytest.raises(ValueError, match="do not match a grid of 3"):
        offset_classification(torch.zeros(1, 5, 5), [-0.1, 0.0, 0.1])


def test_plan_offsets_puts_the_audio_o_after_the_video_inside_the_clip():
    grid, clip_s, duration, fps = offset_grid(1.0, 0.1), 1.0, 4.0, 8.0
    for row in range(20):
        plan = plan_offsets(3, row, duration, clip_s, grid, fps)
        assert plan is not None and plan == plan_offsets(3, row, duration, clip_s, grid, fps)
        for o, v, cands in zip(grid, plan.video_starts, plan.audio_starts, strict=True):
            assert v * fps == pytest.approx(round(v * fps))  # on a frame: the offset is exact
            assert 0.0 <= v <= duration - clip_s
            for g, a in zip(grid, cands, strict=True):
                assert 0.0 <= a <= duration - clip_s + 1e-9
                assert a - v == pytest.approx(o - g)  # candidate g = o is the in-sync audio
    # Another seed places other windows; a clip shorter than clip + 2 * 1.0 s has none.
    assert plan_offsets(4, 0, duration, clip_s, grid, fps) != plan_offsets(
        3, 0, duration, clip_s, grid, fps
    )
    assert plan_offsets(3, 0, 2.9, clip_s, grid, fps) is None
    assert plan_offsets(3, 0, 3.0, clip_s, grid, fps) is not None


def test_plan_offsets_draws_the_video_window_across_the_room():
    starts = [
        plan_offsets(0, row, 4.0, 1.0, [-1.0, 0.0, 1.0], 8.0).video_starts[1] for row in range(200)
    ]
    # True offset 0 leaves [1, 2] for the video window: spread over it, on frames.
    assert min(starts) == 1.0 and max(starts) == 2.0 and len(set(starts)) == 9
    assert np.mean(starts) == pytest.approx(1.5, abs=0.1)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("eval.sync.offset_grid_max=0.25", "whole number of offset_grid_step"),
        ("eval.sync.offset_grid_step=0", "offset_grid_step > 0"),
        ("eval.sync.offset_grid_max=-1", "must be >= 0"),
    ],
)
def test_a_bad_offset_grid_stops_at_start_with_the_key_named(override, message):
    from avts_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=f"eval.sync.offset_grid_max.*{message}"):
        load_config(None, [override])
    assert load_config(None, ["eval.sync.offset_grid_max=0"]).eval.sync.offset_grid_max == 0
