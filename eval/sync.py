"""Audio-visual synchronisation accuracy on held-out clips.

Each held-out clip (windows drawn per clip from ``eval.seed``) gives a video window, its in-sync
audio, and one negative of each kind, placed by :func:`avts_dist.data.pairs.plan_pair` exactly
as training places them:

- easy: audio of another video (the paper's protocol; ``acc_easy`` is the headline figure);
- hard: the same clip's audio from a window that does not overlap the video window;
- superhard: the same clip, overlapping but shifted by ``[data.min_shift, clip length)``;
- offset sweep: the same clip shifted by each of ``eval.sync.offsets`` seconds;
- offset classification (:mod:`eval.sync_offsets`): the best of a grid of audio shifts, zero-shot.

A kind that a clip cannot give (a clip shorter than two windows has no hard negative) is left
out for that clip and counted in ``num_<kind>``. A pair is called in sync when the fusion head's
logit is > 0, or else when the embedding distance is below ``eval.sync.threshold`` (default
``loss.margin / 2``, on L2-normalised embeddings when ``loss.normalize``). Balanced accuracy per
kind = mean of the positive hit rate (``tpr``) and the negative rejection rate (``reject_<kind>``);
``pair_acc_<kind>`` (the positive scored strictly above its own negative) needs no threshold.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from avts_dist.config import LossConfig, SyncEvalConfig
from avts_dist.data import DatasetIndex, read_member
from avts_dist.data.decode import DecodeError, audio_window, decode_audio, decode_video, logmel
from avts_dist.data.decoders import resolve_video_decoder
from avts_dist.data.pairs import NEGATIVE_KINDS, plan_pair
from eval.common import JobIO
from eval.registry import EvalError
from eval.sync_offsets import (
    offset_classification,
    offset_grid,
    score_offsets,
    write_offset_table,
)

__all__ = [
    "ClipPairs",
    "distance_scores",
    "offset_classification",
    "offset_name",
    "plan_clip",
    "run_sync",
    "sync_metrics",
]


def offset_name(offset_s: float) -> str:
    return f"offset_{offset_s:g}s"


@dataclass(frozen=True)
class ClipPairs:
    """The windows of one held-out clip: its video start and, per negative kind it can give,
    the negative's ``(row, audio start)``."""

    row: int
    video_start: float
    negatives: dict[str, tuple[int, float]]


def _offset_start(
    t_v: float, offset_s: float, last: float, rng: np.random.Generator
) -> float | None:
    """``t_v - offset`` or ``t_v + offset`` (drawn when both fit in ``[0, last]``), or None."""
    fits = [t for t in (t_v - offset_s, t_v + offset_s) if -1e-9 <= t <= last + 1e-9]
    if not fits:
        return None
    return float(np.clip(fits[int(rng.integers(len(fits)))], 0.0, max(last, 0.0)))


def plan_clip(
    seed: int,
    row: int,
    pool: np.ndarray,
    durations: np.ndarray,
    video_ids: np.ndarray,
    *,
    clip_s: float,
    min_shift: float,
    offsets: list[float],
) -> ClipPairs:
    """The pairs of clip ``row``: a pure function of ``(seed, row)`` and the index."""
    negatives: dict[str, tuple[int, float]] = {}
    video_start = 0.0
    for kind in NEGATIVE_KINDS:
        # A fresh generator with the same seed for each kind: plan_pair makes its draws in a
        # fixed order whatever the mix, so every kind shares one video window. train=True draws
        # that window uniformly (not centred), so the offset sweep has room on both sides.
        plan = plan_pair(
            np.random.default_rng((seed, row)),
            row,
            pool,
            durations,
            video_ids,
            clip_s,
            min_shift,
            {kind: 1.0},
            train=True,
        )
        video_start = plan.video_start
        if not plan.fell_back:
            negatives[kind] = (plan.neg_row, plan.neg_start)
    rng = np.random.default_rng((seed, row, 1))
    last = float(durations[row]) - clip_s
    for offset_s in offsets:
        start = _offset_start(video_start, offset_s, last, rng)
        if start is not None:
            negatives[offset_name(offset_s)] = (row, start)
    return ClipPairs(row, video_start, negatives)


def distance_scores(
    video_ND: torch.Tensor, audio_ND: torch.Tensor, normalize: bool
) -> torch.Tensor:
    """Higher = more in sync: minus the L2 distance of each pair (of unit vectors if normalize)."""
    if normalize:
        video_ND, audio_ND = F.normalize(video_ND, dim=1), F.normalize(audio_ND, dim=1)
    return -(video_ND - audio_ND).norm(dim=1)


def sync_metrics(
    pos_scores_N: torch.Tensor,
    neg_scores: dict[str, torch.Tensor],
    neg_clips: dict[str, torch.Tensor],
    cut: float,
) -> dict[str, float]:
    """Metrics from pair scores (higher = more in sync; in sync iff score > ``cut``).

    ``pos_scores_N`` has one score per clip; ``neg_scores[kind]`` one per negative, whose clip
    is ``neg_clips[kind]`` (indices into ``pos_scores_N``).
    """
    in_sync = pos_scores_N > cut
    tpr = float(in_sync.float().mean())
    metrics: dict[str, float] = {"tpr": tpr, "num_clips": float(pos_scores_N.numel())}
    for kind, scores in neg_scores.items():
        if scores.numel() == 0:
            continue
        reject = float((scores <= cut).float().mean())
        pair = float((pos_scores_N[neg_clips[kind]] > scores).float().mean())
        metrics[f"acc_{kind}"] = 0.5 * (tpr + reject)
        metrics[f"reject_{kind}"] = reject
        metrics[f"pair_acc_{kind}"] = pair
        metrics[f"num_{kind}"] = float(scores.numel())
    if "acc_easy" in metrics:
        metrics["acc"] = metrics["acc_easy"]
    return metrics


def _video_ids(idx: DatasetIndex) -> np.ndarray:
    """What makes two clips the same video (the loader's rule): ``video_id``, else the key."""
    if "video_id" in idx.extra_columns:
        return np.asarray(idx.column("video_id"))
    return idx.key_bytes


@dataclass
class _Embeddings:
    video: list[torch.Tensor]
    audio: dict[str, list[torch.Tensor]]
    clips: dict[str, list[int]]


def run_sync(
    cfg: SyncEvalConfig, model: torch.nn.Module, loss: LossConfig, io: JobIO
) -> dict[str, float]:
    """Sync accuracy of ``model`` (an :class:`AVTSModel`, trained with ``loss``) on ``io.idx``;
    returns the metrics it logged."""
    idx, data, rt = io.idx, io.data, io.rt
    # A decoder that cannot load fails here, not as every clip skipped.
    decoder = resolve_video_decoder(data.video_decoder)
    split = cfg.split or data.val_split
    clip_s = data.clip_seconds
    pool, rows, video_ids = _usable_rows(cfg, io, split)
    model = model.eval().to(rt.device)
    # Early fusion (model.arch=early_fusion): "embeddings" are the video features at the fusion
    # point and the projected audio; its sync head scores each pair (logit > 0: in sync).
    early = hasattr(model, "fuse_and_score")
    fusion = early or "fusion" in model.heads
    threshold = cfg.threshold or loss.margin / 2
    durations = idx.duration.astype(np.float64)
    fs = idx.open_fs()

    def mel(wave: np.ndarray, start_s: float) -> torch.Tensor:
        window = audio_window(wave, data.sample_rate, start_s, clip_s, strict=False)
        return logmel(window, data.sample_rate, data.num_mel_bins, data.mel_win_ms, data.mel_hop_ms)

    kinds = [*NEGATIVE_KINDS, *(offset_name(o) for o in cfg.offsets)]
    emb = _Embeddings([], {k: [] for k in ["pos", *kinds]}, {k: [] for k in kinds})
    batch_video: list[torch.Tensor] = []
    batch_audio: list[tuple[str, torch.Tensor]] = []
    num_skipped = 0

    @torch.no_grad()
    def flush() -> None:
        if not batch_video:
            return
        video = model.encode_video(torch.stack(batch_video).to(rt.device))
        emb.video.append(video.float().cpu())
        mels = torch.stack([m for _, m in batch_audio]).to(rt.device)
        audio = model.encode_audio(mels, video.shape[2]) if early else model.encode_audio(mels)
        for (kind, _), a in zip(batch_audio, audio.float().cpu(), strict=True):
            emb.audio[kind].append(a[None])
        batch_video.clear()
        batch_audio.clear()

    for row in tqdm(rows, desc="sync pairs", disable=not rt.progress, unit="clip"):
        pairs = plan_clip(
            rt.seed,
            int(row),
            pool,
            durations,
            video_ids,
            clip_s=clip_s,
            min_shift=data.min_shift,
            offsets=list(cfg.offsets),
        )
        media = read_member(fs, idx, pairs.row, "mp4")
        try:
            video = decode_video(
                media,
                pairs.video_start,
                data.num_frames,
                data.fps,
                data.size,
                False,
                decoder=decoder,
            )
            wave = decode_audio(media, data.sample_rate)
        except DecodeError:
            num_skipped += 1
            continue
        clip = sum(t.shape[0] for t in emb.video) + len(batch_video)
        items = [("pos", mel(wave, pairs.video_start))]
        for kind, (neg_row, start) in pairs.negatives.items():
            if neg_row == pairs.row:
                items.append((kind, mel(wave, start)))
                continue
            try:  # only the negative's window is decoded
                neg_media = read_member(fs, idx, neg_row, idx.media_ext(neg_row))
                neg_wave = decode_audio(neg_media, data.sample_rate, start, start + clip_s)
            except DecodeError:
                continue  # this clip has no easy negative; the other clips still do
            items.append((kind, mel(neg_wave, 0.0)))
        batch_video.append(video)
        batch_audio.extend(items)
        for kind, _ in items[1:]:
            emb.clips[kind].append(clip)
        if len(batch_video) >= rt.batch_size:
            flush()
    flush()
    if not emb.video:
        raise EvalError(f"{idx.url}: no clip of split {split!r} could be decoded")

    video = torch.cat(emb.video)
    audio = {
        k: torch.cat(v) if v else video.new_zeros(0, *video.shape[1:]) for k, v in emb.audio.items()
    }
    clips = {k: torch.tensor(v, dtype=torch.long) for k, v in emb.clips.items()}

    score = _scorer(model, early, fusion, loss.normalize, rt.device)
    metrics = sync_metrics(
        score(video, audio["pos"]),
        {k: score(video[clips[k]], audio[k]) for k in kinds if clips[k].numel()},
        clips,
        0.0 if fusion else -threshold,
    )
    metrics |= _offset_metrics(cfg, rows, io, model, early, mel, score)
    metrics["num_skipped"] = float(num_skipped)
    metrics["threshold"] = float(threshold)
    io.log(metrics)
    _log_offset_curve(cfg, io, metrics)
    return metrics


def _usable_rows(
    cfg: SyncEvalConfig, io: JobIO, split: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The split's clips with audio and video of a whole clip (the pool negatives come from),
    the ones evaluated (at most ``max_clips``, evenly spread), and every row's video id."""
    idx, clip_s = io.idx, io.data.clip_seconds
    pool = idx.rows(split=split, status="ok")
    pool = pool[idx.has_audio[pool].astype(bool) & idx.has_video[pool].astype(bool)]
    pool = pool[idx.duration[pool] >= clip_s]
    rows = pool
    if cfg.max_clips and rows.size > cfg.max_clips:
        rows = rows[np.linspace(0, rows.size - 1, cfg.max_clips).astype(int)]
    video_ids = _video_ids(idx)
    if rows.size < 2 or np.unique(video_ids[pool]).size < 2:
        raise EvalError(
            f"{idx.url}: split {split!r} has {rows.size} usable clips with audio and video of at "
            f"least {clip_s:.2f}s from {np.unique(video_ids[pool]).size} video(s); sync "
            "evaluation needs >= 2 of each (set eval.sync.split)"
        )
    return pool, rows, video_ids


def _scorer(model: torch.nn.Module, early: bool, fusion: bool, normalize: bool, device):
    """Pair scores, higher = in sync: early fusion's or the fusion head's logit, else the
    negated embedding distance."""

    @torch.no_grad()
    def score(video_ND: torch.Tensor, audio_ND: torch.Tensor) -> torch.Tensor:
        if early:
            logits = model.fuse_and_score(video_ND.to(device), audio_ND.to(device))
            return logits.float().cpu().reshape(-1)
        if fusion:
            head = model.heads["fusion"]
            return head(video_ND.to(device), audio_ND.to(device)).float().cpu().reshape(-1)
        return distance_scores(video_ND, audio_ND, normalize)

    return score


def _log_offset_curve(cfg: SyncEvalConfig, io: JobIO, metrics: dict[str, float]) -> None:
    """Accuracy against offset as a metric history too (step = offset in ms, for avts compare),
    and as the job's table and plot."""
    curve = [
        (o, metrics[f"acc_{offset_name(o)}"], metrics[f"pair_acc_{offset_name(o)}"])
        for o in cfg.offsets
        if f"acc_{offset_name(o)}" in metrics
    ]
    for o, acc, pair in curve:
        io.log({"acc_vs_offset": acc, "pair_acc_vs_offset": pair}, step=int(round(o * 1000)))
    _write_curve(io.out_dir, curve, metrics)


def _offset_metrics(
    cfg: SyncEvalConfig, rows: np.ndarray, io: JobIO, model, early: bool, mel, score
) -> dict[str, float]:
    """Offset classification on ``rows``, with its accuracy by offset as a metric history (step
    = offset in ms), a table and a plot; nothing when ``eval.sync.offset_grid_max`` is 0."""
    if cfg.offset_grid_max <= 0:
        return {}
    grid = offset_grid(cfg.offset_grid_max, cfg.offset_grid_step)
    device = io.rt.device

    @torch.no_grad()
    def encode(videos: torch.Tensor, mels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        video = model.encode_video(videos.to(device))
        audio = [
            model.encode_audio(m.to(device), video.shape[2])
            if early
            else model.encode_audio(m.to(device))
            for m in mels.split(io.rt.batch_size)
        ]
        return video.float().cpu(), torch.cat(audio).float().cpu()

    scores_NTG, num_left_out = score_offsets(rows, io, grid, mel=mel, encode=encode, score=score)
    if scores_NTG.shape[0] == 0:
        return {"num_offset_left_out": float(num_left_out)}
    result = offset_classification(scores_NTG, grid)
    for o, acc, near, _ in result.by_offset:
        step = int(round(o * 1000))
        io.log({"offset_acc_by_offset": acc, "offset_acc_within1_by_offset": near}, step=step)
    write_offset_table(io.out_dir, result)
    return {**result.metrics, "num_offset_left_out": float(num_left_out)}


def _write_curve(out_dir: Path, curve: list[tuple[float, float, float]], metrics) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "sync_vs_offset.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["offset_s", "balanced_acc", "pair_acc", "num_pairs"])
        w.writerows((o, acc, pair, int(metrics[f"num_{offset_name(o)}"])) for o, acc, pair in curve)
    with (out_dir / "sync_per_kind.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kind", "balanced_acc", "reject_rate", "pair_acc", "num_pairs"])
        for k in NEGATIVE_KINDS:
            if f"acc_{k}" in metrics:
                w.writerow(
                    [
                        k,
                        metrics[f"acc_{k}"],
                        metrics[f"reject_{k}"],
                        metrics[f"pair_acc_{k}"],
                        int(metrics[f"num_{k}"]),
                    ]
                )
    # Figure, not pyplot: no GUI backend, no global figure state.
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    if curve:
        xs = [c[0] for c in curve]
        ax.plot(xs, [c[1] for c in curve], "o-", label="balanced acc (threshold)")
        ax.plot(xs, [c[2] for c in curve], "s--", label="pair acc (pos > neg)")
    for k, style in (("easy", ":"), ("hard", "-.")):
        if f"acc_{k}" in metrics:
            ax.axhline(metrics[f"acc_{k}"], ls=style, c="gray", lw=1, label=f"{k} negatives")
    ax.axhline(0.5, c="k", lw=0.5)
    ax.set_xlabel("audio offset (s)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title("sync accuracy vs time offset", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "sync_vs_offset.png", dpi=100)
