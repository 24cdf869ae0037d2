"""Version 2 of the synthetic corpus: only time ties sound to picture.

Version 1 (:mod:`avts_dist.data.synthetic`) has two confounds that let a sync model pass without
learning timing:

- a clip's audio identity (pitch, timbre) is its visual identity (shape, colour), so an easy
  negative is rejected by appearance alone;
- its bars are all one second long, so an audio shift by a whole bar lines the events up again
  and only their strengths tell it from sync.

Version 2 keeps the events (shared times and strengths across the streams) and the rhythm
classes (the second event of each bar follows the first by ``RHYTHMS[name]``), and changes two
things:

- the audio identity is drawn independently of the visual identity (its own random stream), so
  the ``appearance`` labels name what is on screen only;
- bars are jittered: each bar lasts a whole number of frames drawn from
  ``[BAR_MIN_SECONDS, BAR_MAX_SECONDS]``, and a clip's bar lengths are redrawn until no shift of
  :data:`ECHO_SHIFTS` maps the events of any :data:`ECHO_WINDOW_SECONDS` window onto those of the
  shifted window (:func:`echo_count`), for every rhythm class at once, so the bar lengths tell
  nothing about the class.

:func:`oracle_scores` is the check: an observer that sees only event times, scoring a video
window against audio windows by the events that have no partner.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "BAR_MAX_SECONDS",
    "BAR_MIN_SECONDS",
    "ECHO_SHIFTS",
    "ECHO_WINDOW_SECONDS",
    "echo_count",
    "jittered_events",
    "oracle_offset_curve",
    "oracle_scores",
]

# Bars from 0.75 s (the even rhythm's second event still leaves a whole flash before the next
# bar) to 1.25 s (a gallop bar's long gap stays <= 1 s, so no one-second window is empty).
BAR_MIN_SECONDS = 0.75
BAR_MAX_SECONDS = 1.25
# The echo check: one-second windows (the training clip), shifts up to 2.0 s in 0.1 s steps (any
# two candidates of the +-1.0 s offset grid of `avts eval sync`).
ECHO_WINDOW_SECONDS = 1.0
ECHO_SHIFTS = tuple(round(0.1 * k, 6) for k in range(1, 21))
# Bar-length draws per clip before the one with the fewest echoes is kept (at 8 fps about one
# draw in ten is echo-free; other frame rates may keep a few echoes, counted in the metadata).
MAX_DRAWS = 200


def _frames_of(times: Sequence[float], fps: float) -> np.ndarray:
    return np.round(np.asarray(times, dtype=np.float64) * fps).astype(np.int64)


def echo_count(
    times: Sequence[float],
    seconds: float,
    fps: float,
    window_s: float = ECHO_WINDOW_SECONDS,
    shifts: Sequence[float] = ECHO_SHIFTS,
) -> int:
    """Number of (window, shift) pairs inside ``[0, seconds]`` whose event patterns are equal.

    Events lie on the frame grid and a window of whole frames changes content only at frame
    boundaries, so windows starting on frames cover every window; a shift that is no whole
    number of frames never maps an event onto another one.
    """
    num_frames = round(seconds * fps)
    width = max(1, round(window_s * fps))
    if num_frames < width:
        return 0
    present = np.zeros(num_frames, dtype=bool)
    frames = _frames_of(times, fps)
    present[frames[(frames >= 0) & (frames < num_frames)]] = True
    windows = np.lib.stride_tricks.sliding_window_view(present, width)
    count = 0
    for shift in shifts:
        k = round(shift * fps)
        if k < 1 or abs(k / fps - shift) > 1e-6 or k >= len(windows):
            continue
        count += int((windows[:-k] == windows[k:]).all(axis=1).sum())
    return count


def _bar_frames(rng: np.random.Generator, seconds: float, fps: float) -> list[int]:
    """Bar starts (frames) from before 0 to past ``seconds``: jittered lengths, random phase."""
    lo = max(1, round(BAR_MIN_SECONDS * fps))
    hi = max(lo, round(BAR_MAX_SECONDS * fps))
    start = -int(rng.integers(1, hi + 1))
    # One bar before the first one that shows, as in version 1: its tails reach into the clip.
    starts = [start - int(rng.integers(lo, hi + 1)), start]
    while starts[-1] < seconds * fps:
        starts.append(starts[-1] + int(rng.integers(lo, hi + 1)))
    return starts[:-1]


def jittered_events(
    rng: np.random.Generator,
    delay_s: float,
    seconds: float,
    fps: float,
    delays: Sequence[float] = (),
) -> tuple[list[float], list[float], int]:
    """Event times (s, on the frame grid), strengths in [0, 1] and echoes left for one clip.

    Two events per bar, the second ``delay_s`` after the first. The bar lengths are drawn
    without looking at ``delay_s``: a draw is kept when it has no echo for every delay of
    ``delays`` (all rhythm classes), else the one with the fewest after :data:`MAX_DRAWS`.
    """
    all_delays = sorted({float(delay_s), *map(float, delays)})
    offsets = {d: round(d * fps) for d in all_delays}
    best: tuple[int, list[int]] | None = None
    for _ in range(MAX_DRAWS):
        starts = _bar_frames(rng, seconds, fps)
        echoes = max(echo_count(_train(starts, offsets[d]) / fps, seconds, fps) for d in all_delays)
        if best is None or echoes < best[0]:
            best = (echoes, starts)
        if echoes == 0:
            break
    assert best is not None
    frames = _train(best[1], offsets[float(delay_s)])
    frames = frames[frames < seconds * fps]
    times = [round(int(f) / fps, 6) for f in frames]
    strengths = [round(float(s), 4) for s in rng.uniform(0.0, 1.0, size=len(times))]
    echoes = echo_count(times, seconds, fps)
    return times, strengths, echoes


def _train(starts: Sequence[int], delay_frames: int) -> np.ndarray:
    starts_B = np.asarray(starts, dtype=np.int64)
    return np.stack([starts_B, starts_B + delay_frames], axis=1).reshape(-1)


def oracle_scores(
    times: Sequence[float],
    video_start: float,
    audio_starts: Sequence[float],
    window_s: float = ECHO_WINDOW_SECONDS,
    tol_s: float = 0.02,
) -> np.ndarray:
    """Sync score of each audio window against the video window, from event times alone: minus
    the number of events in either window with no partner within ``tol_s`` in the other
    (0: the patterns are equal; higher = more in sync)."""
    events = np.asarray(times, dtype=np.float64)

    def rel(start: float) -> np.ndarray:
        inside = (events >= start - 1e-9) & (events < start + window_s - 1e-9)
        return events[inside] - start

    video = rel(video_start)
    scores = []
    for start in audio_starts:
        audio = rel(start)
        if video.size == 0 or audio.size == 0:
            scores.append(-float(video.size + audio.size))
            continue
        close = np.abs(video[:, None] - audio[None, :]) < tol_s
        unmatched = (~close.any(1)).sum() + (~close.any(0)).sum()
        scores.append(-float(unmatched))
    return np.asarray(scores)


def oracle_offset_curve(
    trains: Sequence[Sequence[float]],
    seconds: float,
    grid: Sequence[float],
    seed: int = 0,
    window_s: float = ECHO_WINDOW_SECONDS,
) -> dict[float, tuple[float, float]]:
    """``{offset: (pair accuracy, top-1 offset accuracy)}`` of the event-time oracle.

    For each event train and each offset ``o`` of ``grid`` (0 included), a video window is
    drawn where every candidate fits (``v + o - g`` inside the clip for every ``g`` of ``grid``)
    and the audio is that window's, ``o`` later. Pair accuracy: the in-sync audio scores
    strictly above the shifted one (NaN at ``o = 0``). Top-1: of the audio windows ``v + o - g``, the
    one of ``g = o`` alone scores highest (a tie is a miss).
    """
    rng = np.random.default_rng(seed)
    grid_G = np.asarray(sorted(grid), dtype=np.float64)
    reach, last = float(np.abs(grid_G).max()), seconds - window_s
    pair: dict[float, list[bool]] = {float(o): [] for o in grid_G}
    top1: dict[float, list[bool]] = {float(o): [] for o in grid_G}
    for times in trains:
        for o in grid_G:
            lo, hi = max(0.0, reach - o), min(last, last - reach - o)
            if lo > hi:
                raise ValueError(f"a {seconds}s clip has no room for offsets up to {reach}s")
            v = float(rng.uniform(lo, hi))
            synced, shifted = oracle_scores(times, v, [v, v + o], window_s)
            if o != 0:
                pair[float(o)].append(bool(synced > shifted))
            scores = oracle_scores(times, v, v + o - grid_G, window_s)
            best = np.flatnonzero(scores == scores.max())
            top1[float(o)].append(best.size == 1 and bool(np.isclose(grid_G[best[0]], o)))
    return {
        o: (float(np.mean(pair[o])) if pair[o] else float("nan"), float(np.mean(top1[o])))
        for o in pair
    }
