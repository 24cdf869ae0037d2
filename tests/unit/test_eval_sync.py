"""Sync evaluation on hand-built scores and indexes: the scorer's answers are worked out by hand
here, and the pairs must be placed exactly as training places negatives (data/pairs.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from avts_dist.data.pairs import plan_pair
from eval.sync import distance_scores, offset_name, plan_clip, sync_metrics


def test_distance_scores_by_hand():
    video = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    audio = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    assert distance_scores(video, audio, normalize=False).tolist() == pytest.approx(
        [0.0, -math.sqrt(5.0)]
    )
    # Unit vectors first: (1, 0) against (0, 1).
    assert distance_scores(video, audio, normalize=True).tolist() == pytest.approx(
        [0.0, -math.sqrt(2.0)]
    )


def _scores(distances: list[float]) -> torch.Tensor:
    return -torch.tensor(distances)


def test_sync_metrics_known_answer():
    """Threshold 0.5 on distances (cut = -0.5 on scores); every figure below is by hand."""
    pos = _scores([0.1, 0.2, 0.9, 0.3])  # in sync: yes, yes, no, yes -> tpr 3/4
    neg = {
        "easy": _scores([1.0, 0.4, 0.8, 1.2]),  # rejected: yes, no, yes, yes -> 3/4
        "hard": _scores([0.05, 0.85, 0.6]),  # clips 0, 2, 3; rejected: no, yes, yes -> 2/3
        "superhard": _scores([0.45]),  # clip 1; rejected: no -> 0
        offset_name(0.5): _scores([0.2]),  # clip 1, a tie with its positive
    }
    clips = {
        "easy": torch.tensor([0, 1, 2, 3]),
        "hard": torch.tensor([0, 2, 3]),
        "superhard": torch.tensor([1]),
        offset_name(0.5): torch.tensor([1]),
    }
    m = sync_metrics(pos, neg, clips, cut=-0.5)
    assert m["tpr"] == pytest.approx(0.75) and m["num_clips"] == 4
    assert m["reject_easy"] == pytest.approx(0.75)
    assert m["acc_easy"] == pytest.approx(0.75) and m["acc"] == m["acc_easy"]
    # pos closer than its own negative: 0.1<1.0, 0.2<0.4, 0.9<0.8 no, 0.3<1.2
    assert m["pair_acc_easy"] == pytest.approx(0.75)
    assert m["reject_hard"] == pytest.approx(2 / 3)
    assert m["acc_hard"] == pytest.approx(0.5 * (0.75 + 2 / 3))
    # pairs by clip: 0.1<0.05 no, 0.9<0.85 no, 0.3<0.6 yes
    assert m["pair_acc_hard"] == pytest.approx(1 / 3) and m["num_hard"] == 3
    assert m["reject_superhard"] == 0.0 and m["acc_superhard"] == pytest.approx(0.375)
    assert m["pair_acc_superhard"] == 1.0  # 0.2 < 0.45
    # A tie is not "scored above": pair accuracy needs the positive strictly closer.
    assert m["pair_acc_offset_0.5s"] == 0.0 and m["num_offset_0.5s"] == 1


def test_sync_metrics_leaves_out_kinds_without_pairs():
    m = sync_metrics(
        _scores([0.1, 0.2]),
        {"easy": _scores([1.0, 1.0]), "hard": _scores([])},
        {"easy": torch.tensor([0, 1]), "hard": torch.tensor([], dtype=torch.long)},
        cut=-0.5,
    )
    assert m["acc_easy"] == 1.0 and "acc_hard" not in m and "num_hard" not in m


@pytest.fixture
def toy_index():
    """10 clips of 4 s from 5 videos (two clips each), plus one 1.5 s clip of a sixth video."""
    durations = np.array([4.0] * 10 + [1.5])
    video_ids = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5])
    return np.arange(11), durations, video_ids


def test_plan_clip_places_each_kind_by_its_definition(toy_index):
    pool, durations, video_ids = toy_index
    clip_s, min_shift, offsets = 1.0, 0.25, [0.5, 2.5]
    for row in range(10):
        pairs = plan_clip(
            7, row, pool, durations, video_ids, clip_s=clip_s, min_shift=min_shift, offsets=offsets
        )
        t_v, last = pairs.video_start, durations[row] - clip_s
        assert 0.0 <= t_v <= last
        assert set(pairs.negatives) >= {"easy", "hard", "superhard", offset_name(0.5)}
        easy_row, easy_start = pairs.negatives["easy"]
        assert video_ids[easy_row] != video_ids[row] and 0 <= easy_start <= 3.0
        for kind in ("hard", "superhard", offset_name(0.5), offset_name(2.5)):
            if kind not in pairs.negatives:
                continue
            neg_row, start = pairs.negatives[kind]
            assert neg_row == row and 0.0 <= start <= last
            shift = abs(start - t_v)
            if kind == "hard":
                assert shift >= clip_s  # windows do not overlap
            elif kind == "superhard":
                assert min_shift <= shift < clip_s  # overlapping, out of sync
            else:
                assert shift == pytest.approx(float(kind[len("offset_") : -1]))
        # The video window is the one training's own planner gives for this (seed, row).
        train_plan = plan_pair(
            np.random.default_rng((7, row)),
            row,
            pool,
            durations,
            video_ids,
            clip_s,
            min_shift,
            {"hard": 1.0},
            True,
        )
        assert t_v == train_plan.video_start
        assert pairs.negatives["hard"] == (row, train_plan.neg_start)


def test_plan_clip_is_a_pure_function_and_drops_impossible_kinds(toy_index):
    pool, durations, video_ids = toy_index
    kw = dict(clip_s=1.0, min_shift=0.25, offsets=[0.25, 2.5])
    assert plan_clip(3, 4, pool, durations, video_ids, **kw) == plan_clip(
        3, 4, pool, durations, video_ids, **kw
    )
    assert plan_clip(3, 4, pool, durations, video_ids, **kw) != plan_clip(
        4, 4, pool, durations, video_ids, **kw
    )
    # 1.5 s: no window 1 s away from another inside it, no 2.5 s offset; super-hard still fits.
    short = plan_clip(3, 10, pool, durations, video_ids, **kw)
    assert "hard" not in short.negatives and offset_name(2.5) not in short.negatives
    assert {"easy", "superhard", offset_name(0.25)} <= set(short.negatives)
