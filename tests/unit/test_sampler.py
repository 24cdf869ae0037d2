"""The global order, per-rank slicing, per-sample generators, mix schedule and pair constraints."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avts_dist.data.blocks import BlockSampler, auto_streams
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
            # (a zero-length range counts as none: a 3 s clip centred at 1 s has no hard start)
            assert plan.fell_back and last <= CLIP + plan.video_start and plan.video_start <= CLIP
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


# ---- the block order (data.access=block) ----


def block_dataset(num_shards=7, per_shard=23, seed=0):
    """Index columns of a toy dataset: clips of 20-60 KB back to back in shards (tar-like
    1.5 KB of headers between them), rows interleaved across shards as writers do."""
    rng = np.random.default_rng(seed)
    n = num_shards * per_shard
    size = rng.integers(20_000, 60_000, n)
    shard = np.repeat(np.arange(num_shards), per_shard)
    start = np.zeros(n, dtype=np.int64)
    for s in range(num_shards):
        rows = np.flatnonzero(shard == s)
        start[rows] = np.cumsum(size[rows] + 1536) - size[rows]
    perm = rng.permutation(n)  # row ids not in shard order
    return shard[perm], start[perm], start[perm] + size[perm]


def block_sampler(
    pool=None, batch=12, streams=4, window=2, block_bytes=150_000, drop_last=True, **kw
):
    shard, start, end = block_dataset(**kw)
    pool = np.arange(len(shard)) if pool is None else pool
    return BlockSampler(
        pool,
        batch,
        seed=3,
        shard=shard,
        start=start,
        end=end,
        block_bytes=block_bytes,
        window_blocks=window,
        num_streams=streams,
        drop_last=drop_last,
    )


def test_blocks_are_byte_runs_of_one_shard():
    s = block_sampler()
    for lo, hi in zip(s.block_starts[:-1], s.block_starts[1:], strict=True):
        assert len(set(s.shard[lo:hi])) == 1
        assert s.end[hi - 1] - s.start[lo] <= 150_000 or hi - lo == 1
        assert (s.start[lo + 1 : hi] >= s.end[lo : hi - 1]).all()  # in byte order
    assert s.max_block_bytes <= 150_000
    assert auto_streams(12) == 12 and auto_streams(2048) == 256 and auto_streams(12, 4) == 4


def test_block_order_covers_each_clip_once_per_epoch():
    s = block_sampler()
    n = len(s.pool)
    for epoch in range(3):
        order = s.order(epoch)
        assert len(order) == s.steps_per_epoch * 12 == n - n % 12
        assert len(set(order.tolist())) == len(order)
        assert set(order.tolist()) <= set(s.pool.tolist())
        assert [s.row_at(epoch, p) for p in range(len(order))] == order.tolist()
    assert not np.array_equal(s.order(0), s.order(1))
    # A pure function of (seed, epoch): a fresh sampler agrees, in any order of asking.
    fresh = block_sampler()
    np.testing.assert_array_equal(fresh.order(2), s.order(2))
    np.testing.assert_array_equal(fresh.order(0), s.order(0))
    # Without drop_last the last step wraps around: every clip at least once.
    tail = block_sampler(drop_last=False)
    assert set(tail.order(0).tolist()) == set(tail.pool.tolist())


def test_streams_windows_and_pieces():
    s = block_sampler()
    q, length = s.per_stream_step, s.stream_len
    for epoch in range(2):
        eb = s.blocks(epoch)
        order = s.order(epoch)
        for p in range(len(order)):
            step, within = divmod(p, 12)
            stream = within // q
            slot = s.slot(p)
            assert slot // length == stream and (slot % length) // q == step
            window, piece = eb.window[slot], eb.piece[slot]
            assert eb.window_lo[window] <= slot < eb.window_hi[window]
            assert piece in eb.pieces_of(window)
            # The clip's bytes lie inside its piece, a range of one shard.
            i = eb.clip[slot]
            assert eb.piece_shard[piece] == s.shard[i]
            assert eb.piece_start[piece] <= s.start[i] and s.end[i] <= eb.piece_end[piece]
            assert eb.window_last_step[window] >= step
        # Pieces of a stream never span its boundary, and no byte is in two pieces.
        spans = sorted(zip(eb.piece_shard, eb.piece_start, eb.piece_end, strict=True))
        for (sa, _, ea), (sb, sb_start, _) in zip(spans, spans[1:], strict=False):
            assert sa != sb or ea <= sb_start
        assert len(eb.pieces_of(0)) <= s.window_blocks


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_each_rank_needs_only_its_streams_pieces(world_size):
    """With streams a multiple of the world size, ranks read disjoint pieces, each once: the
    bytes a whole job reads per epoch are the clips' bytes plus the gaps read through."""
    s = block_sampler()
    eb = s.blocks(0)
    needed = []
    for rank in range(world_size):
        pieces = set()
        for step in range(s.steps_per_epoch):
            for p in s.positions(step, rank, world_size):
                pieces.add(int(eb.piece[s.slot(p)]))
        assert {int(eb.window[s.slot(p)]) for p in s.positions(0, rank, world_size)}
        needed.append(pieces)
        streams = s.streams_of(rank, world_size)
        assert len(streams) == 4 // world_size
    assert set().union(*needed) == set(range(len(eb.piece_start)))
    assert sum(len(x) for x in needed) == len(eb.piece_start)
    used = eb.clip
    clip_bytes = (s.end[used] - s.start[used]).sum()
    piece_bytes = (eb.piece_end - eb.piece_start).sum()
    assert clip_bytes <= piece_bytes <= 1.1 * clip_bytes


def test_block_order_shuffles_within_windows_only():
    s = block_sampler(window=1, streams=2, batch=2, num_shards=3, per_shard=20)
    eb = s.blocks(0)
    # window = one piece: every window holds one piece's clips, in a shuffled order.
    for w in range(eb.num_windows):
        lo, hi = eb.window_lo[w], eb.window_hi[w]
        assert len(set(eb.piece[lo:hi].tolist())) == 1
    shuffled = [
        w
        for w in range(eb.num_windows)
        if list(eb.clip[eb.window_lo[w] : eb.window_hi[w]])
        != sorted(eb.clip[eb.window_lo[w] : eb.window_hi[w]])
    ]
    assert shuffled
