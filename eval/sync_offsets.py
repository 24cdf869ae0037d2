"""Offset classification, zero-shot from the sync scores (`avts eval sync`).

The field reports sync as a classification of the audio offset: Synchformer and SparseSync use
21 classes over +-2.0 s in 0.2 s steps on 10 s clips, and report accuracy and accuracy within
one class. Our clips are 4 s long and the nets see 1 s windows, so the grid is scaled to them:
``eval.sync.offset_grid_max`` (default 1.0 s) in ``eval.sync.offset_grid_step`` (0.1 s) steps,
21 classes again. Every candidate window must lie inside the clip, which takes a clip of at
least ``clip + 2 * max`` seconds (3 s for the defaults).

For each held-out clip and each true offset ``o`` of the grid, the video window starts at ``v``
(on the video's frame grid, so that the offset is exact) and the audio is the clip's own, ``o``
later. Each candidate shift ``g`` of the grid scores the audio window starting at ``v + o - g``
against the video window (the same score as the binary metrics: fusion logit, or minus the
embedding distance); the prediction is the best-scoring ``g``, and ``g = o`` is the right one.
No training: the sync model is the classifier.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from avts_dist.data import read_member
from avts_dist.data.decode import DecodeError, decode_audio, decode_video
from eval.common import JobIO

__all__ = [
    "OffsetPlan",
    "OffsetResult",
    "offset_classification",
    "offset_grid",
    "plan_offsets",
    "score_offsets",
    "write_offset_table",
]


def offset_grid(max_s: float, step_s: float) -> list[float]:
    """``[-max, ..., 0, ..., +max]`` in ``step`` steps (``max`` a whole number of steps)."""
    n = round(max_s / step_s)
    return [round(k * step_s, 6) for k in range(-n, n + 1)]


@dataclass(frozen=True)
class OffsetPlan:
    """The windows of one clip: per true offset (grid order) the video start, and the audio
    start of each candidate shift (grid order)."""

    row: int
    video_starts: list[float]
    audio_starts: list[list[float]]


def plan_offsets(
    seed: int, row: int, duration: float, clip_s: float, grid: list[float], fps: float
) -> OffsetPlan | None:
    """The windows of clip ``row`` (a pure function of ``(seed, row)``), or None when the clip
    is shorter than ``clip_s + 2 * max|grid|``.

    One uniform draw places the video window within the room each true offset leaves, so the
    audio windows of all offsets come from the same part of the clip.
    """
    reach = max(abs(g) for g in grid)
    last = duration - clip_s
    if last < 2 * reach - 1e-9:
        return None
    u = float(np.random.default_rng((seed, row, 2)).uniform())
    video_starts, audio_starts = [], []
    for o in grid:
        lo, hi = max(0.0, reach - o), min(last, last - reach - o)
        v = lo + u * (hi - lo)
        # A window on a frame boundary shows exactly the frames from v on: the offset is exact.
        # The nearest frame inside [lo, hi], when there is one.
        first, last_frame = math.ceil(lo * fps - 1e-6), math.floor(hi * fps + 1e-6)
        if first <= last_frame:
            v = min(max(round(v * fps), first), last_frame) / fps
        video_starts.append(v)
        audio_starts.append([float(np.clip(v + o - g, 0.0, last)) for g in grid])
    return OffsetPlan(row, video_starts, audio_starts)


@dataclass
class OffsetResult:
    metrics: dict[str, float]
    # (true offset s, accuracy, accuracy within one class, clips) per class, grid order.
    by_offset: list[tuple[float, float, float, int]]


def offset_classification(scores_NTG: torch.Tensor, grid: list[float]) -> OffsetResult:
    """Metrics from ``scores_NTG[n, t, g]``: clip ``n``'s score, at true offset ``grid[t]``,
    of the candidate shift ``grid[g]`` (higher = more in sync). The prediction is the argmax
    over ``g`` (the first one on a tie); right when ``g = t``, within one class when
    ``|g - t| <= 1``."""
    num_clips, num_true, num_cand = scores_NTG.shape
    if num_true != len(grid) or num_cand != len(grid):
        raise ValueError(f"scores {tuple(scores_NTG.shape)} do not match a grid of {len(grid)}")
    pred_NT = scores_NTG.argmax(dim=2)
    true_NT = torch.arange(num_true).expand_as(pred_NT)
    hit_NT = (pred_NT == true_NT).float()
    near_NT = ((pred_NT - true_NT).abs() <= 1).float()
    metrics = {
        "offset_acc": float(hit_NT.mean()),
        "offset_acc_within1": float(near_NT.mean()),
        "num_offset_clips": float(num_clips),
        "num_offset_classes": float(num_true),
    }
    by_offset = [
        (float(o), float(hit_NT[:, t].mean()), float(near_NT[:, t].mean()), num_clips)
        for t, o in enumerate(grid)
    ]
    return OffsetResult(metrics, by_offset)


def score_offsets(
    rows: np.ndarray,
    io: JobIO,
    grid: list[float],
    *,
    mel: Callable[[np.ndarray, float], torch.Tensor],
    encode: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, int]:
    """``scores_NTG`` of the clips ``rows`` that are long enough and decode, and how many were
    left out. ``encode(videos, mels)`` gives the embeddings of both, ``score`` a pair score."""
    idx, data, rt = io.idx, io.data, io.rt
    fs = idx.open_fs()
    per_clip, num_left_out = [], 0
    for row in tqdm(rows, desc="offset classes", disable=not rt.progress, unit="clip"):
        plan = plan_offsets(
            rt.seed, int(row), float(idx.duration[row]), data.clip_seconds, grid, data.fps
        )
        if plan is None:
            num_left_out += 1
            continue
        media = read_member(fs, idx, plan.row, "mp4")
        starts = list(dict.fromkeys(plan.video_starts))
        try:
            wave = decode_audio(media, data.sample_rate)
            videos = [
                decode_video(
                    media,
                    s,
                    data.num_frames,
                    data.fps,
                    data.size,
                    False,
                    decoder=data.video_decoder,
                )
                for s in starts
            ]
        except DecodeError:
            num_left_out += 1
            continue
        mels = torch.stack([mel(wave, s) for cands in plan.audio_starts for s in cands])
        video_VD, audio_PD = encode(torch.stack(videos), mels)
        which = torch.tensor([starts.index(v) for v in plan.video_starts for _ in grid])
        per_clip.append(score(video_VD[which], audio_PD).reshape(len(grid), len(grid)))
    if not per_clip:
        return torch.zeros(0, len(grid), len(grid)), num_left_out
    return torch.stack(per_clip), num_left_out


def write_offset_table(out_dir: Path, result: OffsetResult) -> None:
    """``offset_classes.csv`` (accuracy by true offset) and ``offset_classes.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "offset_classes.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["offset_s", "acc", "acc_within1", "num_clips"])
        w.writerows(result.by_offset)
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    xs = [r[0] for r in result.by_offset]
    m = result.metrics
    ax.plot(xs, [r[1] for r in result.by_offset], "o-", label=f"top-1 ({m['offset_acc']:.2f})")
    ax.plot(
        xs,
        [r[2] for r in result.by_offset],
        "s--",
        label=f"within one class ({m['offset_acc_within1']:.2f})",
    )
    ax.axhline(1.0 / max(len(xs), 1), c="k", lw=0.5, label="chance (top-1)")
    ax.set_xlabel("true audio offset (s)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(
        f"offset classification, {len(xs)} classes, {int(m['num_offset_clips'])} clips", fontsize=9
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "offset_classes.png", dpi=100)
