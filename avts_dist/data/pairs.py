"""AVTS pair planning: which windows and which negative, from the index alone.

A plan is computed before any byte is read (durations come from the index), so reads can be
issued ahead of decoding. All choices draw from one generator in a fixed order, so a plan is a
pure function of ``(seed, epoch, global position, attempt)`` and of the negative mix.

Negative kinds (AVTS, Korbar et al. 2018):

- easy (0): audio of another video;
- hard (1): same video, windows do not overlap: ``|offset| >= clip length``;
- superhard (2): same video, overlapping but out of sync: ``min_shift <= |offset| < clip length``.

``train.objective=video_ssl`` plans two views of one clip instead (:func:`plan_views`): two
windows drawn independently, each with its own augmentation seed (CVRL's positive pair).

A kind that cannot be drawn for a clip (a video shorter than two clips cannot give a hard
negative) falls back to easy; ``neg_kind`` always reports the kind actually delivered.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "EASY",
    "HARD",
    "NEGATIVE_KINDS",
    "SUPERHARD",
    "PairPlan",
    "ViewsPlan",
    "choose_kind",
    "hard_start",
    "mix_probabilities",
    "plan_pair",
    "plan_views",
    "superhard_start",
    "video_start",
]

NEGATIVE_KINDS = ("easy", "hard", "superhard")
EASY, HARD, SUPERHARD = 0, 1, 2


@dataclass(frozen=True)
class PairPlan:
    row: int
    video_start: float
    neg_kind: int
    neg_row: int
    neg_start: float
    # Seed of the augmentation generator (crop, flip), drawn from the plan's generator.
    aug_seed: int
    # True when the requested kind was impossible for this clip and easy was used instead.
    fell_back: bool = False


def mix_probabilities(mix: dict[str, float]) -> np.ndarray:
    """Normalised probabilities in ``NEGATIVE_KINDS`` order."""
    p = np.array([float(mix.get(k, 0.0)) for k in NEGATIVE_KINDS], dtype=np.float64)
    if (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"invalid negative mix {mix}")
    return p / p.sum()


def choose_kind(mix: dict[str, float], rng: np.random.Generator) -> int:
    # One uniform draw always, so later draws do not depend on the mix's shape.
    u = rng.random()
    cdf = np.cumsum(mix_probabilities(mix))
    return int(min(np.searchsorted(cdf, u, side="right"), len(NEGATIVE_KINDS) - 1))


def video_start(duration: float, clip_s: float, train: bool, rng: np.random.Generator) -> float:
    """Uniform in ``[0, duration - clip_s]`` for training, the centred window otherwise."""
    span = max(0.0, duration - clip_s)
    u = rng.random()  # drawn in both modes to keep the draw order fixed
    return float(u * span) if train else span / 2.0


def _uniform_on(intervals: list[tuple[float, float]], u: float) -> float | None:
    lengths = [max(0.0, hi - lo) for lo, hi in intervals]
    total = sum(lengths)
    if total <= 0:
        return None
    t = u * total
    for (lo, _hi), length in zip(intervals, lengths, strict=True):
        if t <= length and length > 0:
            return lo + t
        t -= length
    lo, hi = intervals[-1]
    return hi


def hard_start(
    duration: float, clip_s: float, start: float, rng: np.random.Generator
) -> float | None:
    """A start with ``|s - start| >= clip_s`` inside the video, or None when there is none."""
    last = duration - clip_s
    u = rng.random()
    return _uniform_on([(0.0, start - clip_s), (start + clip_s, last)], u)


def superhard_start(
    duration: float,
    clip_s: float,
    min_shift: float,
    start: float,
    rng: np.random.Generator,
    margin: float = 1e-3,
) -> float | None:
    """A start with ``min_shift <= |s - start| < clip_s`` inside the video, or None.

    ``margin`` keeps the offset strictly below one clip after rounding to audio samples.
    """
    last = duration - clip_s
    u = rng.random()
    hi = clip_s - margin
    intervals = [
        (max(0.0, start - hi), max(0.0, start - min_shift)),
        (min(last, start + min_shift), min(last, start + hi)),
    ]
    return _uniform_on(intervals, u)


def plan_pair(
    rng: np.random.Generator,
    row: int,
    pool: np.ndarray,
    durations: np.ndarray,
    video_ids: np.ndarray,
    clip_s: float,
    min_shift: float,
    mix: dict[str, float],
    train: bool,
) -> PairPlan:
    """The windows and negative of one sample of clip ``row``.

    ``pool`` holds the rows that may be sampled; ``durations`` and ``video_ids`` are indexed by
    row. Easy negatives come from the pool, from a different video.
    """
    duration = float(durations[row])
    kind = choose_kind(mix, rng)
    v_start = video_start(duration, clip_s, train, rng)
    # Draws below are always made in this order, whatever the kind, so the plan of one kind
    # does not shift the draws of another.
    u_hard = hard_start(duration, clip_s, v_start, rng)
    u_super = superhard_start(duration, clip_s, min_shift, v_start, rng)
    neg_pick = rng.integers(0, len(pool), size=8)
    u_easy = rng.random()
    aug_seed = int(rng.integers(0, 2**63 - 1))

    neg_start: float | None = None
    fell_back = False
    if kind == HARD:
        neg_start = u_hard
    elif kind == SUPERHARD:
        neg_start = u_super
    if kind != EASY and neg_start is None:
        kind, fell_back = EASY, True
    neg_row = row
    if kind == EASY:
        own = video_ids[row]
        candidates = [int(pool[i]) for i in neg_pick if video_ids[int(pool[i])] != own]
        if not candidates:
            # Rare (tiny pools): scan from a drawn offset for the first other video.
            offset = int(neg_pick[0])
            for j in range(len(pool)):
                r = int(pool[(offset + j) % len(pool)])
                if video_ids[r] != own:
                    candidates = [r]
                    break
        if not candidates:
            raise ValueError("easy negatives need at least two videos in the dataset")
        neg_row = candidates[0]
        neg_span = max(0.0, float(durations[neg_row]) - clip_s)
        neg_start = u_easy * neg_span if train else neg_span / 2.0
    return PairPlan(
        row=int(row),
        video_start=float(v_start),
        neg_kind=int(kind),
        neg_row=int(neg_row),
        neg_start=float(neg_start),
        aug_seed=aug_seed,
        fell_back=fell_back,
    )


@dataclass(frozen=True)
class ViewsPlan:
    """Two windows of clip ``row`` (the video-only objective): no audio, no negative."""

    row: int
    video_start: float
    video2_start: float
    aug_seed: int
    aug2_seed: int


def plan_views(
    rng: np.random.Generator, row: int, durations: np.ndarray, clip_s: float
) -> ViewsPlan:
    """Two windows of clip ``row``, uniform and independent, each with its own augmentation.

    Random in evaluation too: two centred windows would be one window twice. ``rng`` is keyed by
    the sample's position, so an evaluation pass still sees the same pairs every time.
    """
    duration = float(durations[row])
    starts = [video_start(duration, clip_s, True, rng) for _ in range(2)]
    seeds = rng.integers(0, 2**63 - 1, size=2)
    return ViewsPlan(int(row), starts[0], starts[1], int(seeds[0]), int(seeds[1]))
