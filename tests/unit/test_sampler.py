"""The global order, per-rank slicing, per-sample generators, mix schedule and pair constraints."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avts_dist.data.pairs import EASY, HARD, SUPERHARD, plan_pair
from avts_dist.data.sampler import GlobalSampler, LoaderState, MixSchedule, sample_rng


def test_order_is_a_function_of_seed_and_epoch():
    pool = np.arange(100, 150)
    a, b = GlobalSampler(pool, 8, seed=3), GlobalSampler(pool, 8, seed=3)
    np.testing.assert_array_equal(a.order(0), b.order(0))
    assert sorted(a.order(1).tolist()) == pool.tolist()
    assert not np.array_equal(a.order(0), a.order(1))
    assert not np.array_equal(a.order(0), GlobalSampler(pool, 8, seed=4).order(0))
    assert a.steps_per_epoch == 6
    assert GlobalSampler(pool, 8, seed=3, drop_last=False).steps_per_epoch == 7


@pytest.mark.parametrize("world_size", [1, 2, 3, 6])
def test_rank_slices_tile_the_global_batch(world_size):
    s = GlobalSampler(np.arange(40), 12, seed=0)
    for step in range(5):
        got = [p for r in range(world_size) for p in s.positions(step, r, world_size)]
        base = (step % s.steps_per_epoch) * 12
        assert got == list(range(base, base + 12))
    with pytest.raises(ValueError, match="divisible"):
        s.positions(0, 0, 5)


def test_sample_rng_is_counter_based():
    x = sample_rng(1, 2, 3).random(4)
    np.testing.assert_array_equal(x, sample_rng(1, 2, 3).random(4))
    for other in (
        sample_rng(1, 2, 4),
        sample_rng(1, 3, 3),
        sample_rng(2, 2, 3),
        sample_rng(1, 2, 3, 1),
    ):
        assert not np.array_equal(x, other.random(4))


def test_mix_schedule_and_state_round_trip():
    sched = MixSchedule([(0, {"easy": 1.0})])
    assert not sched.set_from(3, {"easy": 1.0})
    assert sched.set_from(5, {"easy": 0.75, "hard": 0.25})
    assert sched.set_from(9, {"hard": 1.0})
    assert (
        sched.at(4) == {"easy": 1.0}
        and sched.at(5)["hard"] == 0.25
        and sched.at(100) == {"hard": 1.0}
    )
    # Re-setting from an earlier step drops the later entries.
    sched2 = MixSchedule.from_list(json.loads(json.dumps(sched.to_list())))
    assert sched2.entries == sched.entries
    sched2.set_from(7, {"superhard": 1.0})
    assert sched2.at(100) == {"superhard": 1.0}
    state = LoaderState(3, 1, sched.to_list(), 0, 8, 40)
    assert LoaderState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    with pytest.raises(ValueError, match="version"):
        LoaderState.from_dict({**state.to_dict(), "version": 99})


CLIP = 1.0
MIN_SHIFT = 0.25


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    kind=st.sampled_from(["easy", "hard", "superhard"]),
    duration=st.floats(1.0, 12.0),
    train=st.booleans(),
)
def test_pair_constraints_per_kind(seed, kind, duration, train):
    pool = np.arange(6)
    durations = np.array([duration, 4.0, 1.5, 3.0, 10.0, 2.2])
    video_ids = np.array([b"a", b"a", b"b", b"c", b"d", b"e"])  # rows 0 and 1: same video
    rng = np.random.default_rng(seed)
    plan = plan_pair(rng, 0, pool, durations, video_ids, CLIP, MIN_SHIFT, {kind: 1.0}, train)
    last = duration - CLIP
    assert -1e-9 <= plan.video_start <= last + 1e-9
    if not train:
        assert plan.video_start == pytest.approx(last / 2)
    offset = abs(plan.neg_start - plan.video_start)
    if plan.neg_kind == EASY:
        assert video_ids[plan.neg_row] != video_ids[0]
        assert 0 <= plan.neg_start <= durations[plan.neg_row] - CLIP + 1e-9
        # Easy is used for another kind only where that kind is impossible.
        if kind == "hard":
            assert plan.fell_back and last < CLIP + plan.video_start and plan.video_start < CLIP
        if kind == "superhard":
            assert plan.fell_back
    else:
        assert plan.neg_row == 0 and 0 <= plan.neg_start <= last + 1e-9
        expected = {"hard": HARD, "superhard": SUPERHARD}[kind]
        assert plan.neg_kind == expected
        if expected == HARD:
            assert offset >= CLIP - 1e-9
        else:
            assert MIN_SHIFT - 1e-9 <= offset < CLIP


def test_kind_frequencies_follow_the_mix():
    pool = np.arange(4)
    durations = np.full(4, 10.0)
    ids = np.array([b"a", b"b", b"c", b"d"])
    mix = {"easy": 0.5, "hard": 0.3, "superhard": 0.2}
    kinds = [
        plan_pair(sample_rng(0, 0, p), 0, pool, durations, ids, CLIP, MIN_SHIFT, mix, True).neg_kind
        for p in range(3000)
    ]
    freq = np.bincount(kinds, minlength=3) / len(kinds)
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.2], atol=0.04)
