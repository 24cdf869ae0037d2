"""Audio-visual synchronisation accuracy on held-out clips.

For each held-out clip (deterministic per clip and ``eval.seed``): a video window at ``t_v``, the
in-sync audio window, and negatives of each kind:

- easy: another clip's audio (the paper's protocol; ``acc_easy`` is the headline figure);
- hard: the same clip's audio from a window that does not overlap the video window;
- superhard: the same clip, overlapping but shifted by ``[data.min_shift, clip length)``;
- offset sweep: the same clip shifted by each of ``eval.sync_offsets`` seconds.

A pair is called in sync when the fusion head's logit is > 0, or else when the embedding distance
is below ``eval.sync_threshold`` (default ``loss.margin / 2``, on L2-normalised embeddings when
``loss.normalize``). Balanced accuracy per kind = mean of the positive hit rate and the negative
rejection rate; ``pair_acc_<kind>`` (positive scored above its negative) needs no threshold.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from eval.common import EvalError, pick_device

__all__ = ["run_sync"]


def _audio_start(rng, t_v: float, clip_s: float, last: float, lo: float, hi: float):
    """A start ``t_a`` in ``[0, last]`` with ``lo <= |t_a - t_v| < hi``, or None."""
    options = []
    for sign in (-1, 1):
        a, b = sorted((t_v + sign * lo, t_v + sign * min(hi, 1e9)))
        a, b = max(a, 0.0), min(b, last)
        if b > a:
            options.append((a, b))
    if not options:
        return None
    a, b = options[int(rng.integers(len(options)))]
    return float(rng.uniform(a, b))


def run_sync(job: str, cfg, pre, idx, out_dir: Path, log) -> dict[str, float]:
    from tqdm.auto import tqdm

    from avts_dist.data.decode import DecodeError, audio_window, decode_audio, decode_video, logmel
    from avts_dist.data.index import read_member

    ev, data = cfg.eval, cfg.data
    device = pick_device(ev.device)
    split = ev.sync_split or data.val_split
    rows = idx.rows(split=split, status="ok")
    rows = rows[idx.has_audio[rows].astype(bool) & idx.has_video[rows].astype(bool)]
    clip_s = data.clip_seconds
    rows = rows[idx.duration[rows] >= clip_s]
    if ev.sync_max_clips and rows.size > ev.sync_max_clips:
        rows = rows[np.linspace(0, rows.size - 1, ev.sync_max_clips).astype(int)]
    if rows.size < 2:
        raise EvalError(
            f"{idx.url}: split {split!r} has {rows.size} usable clips with audio and video of at "
            f"least {clip_s:.2f}s; sync evaluation needs >= 2 (set eval.sync_split)"
        )
    model = pre.model().eval().to(device)
    fusion = "fusion" in model.heads
    threshold = ev.sync_threshold or cfg.loss.margin / 2
    offsets = [float(o) for o in ev.sync_offsets]
    kinds = ["pos", "hard", "superhard", *[f"off{o:g}" for o in offsets]]
    fs = idx.open_fs()

    def mel(wave, sr, t):
        return logmel(
            audio_window(wave, sr, t, clip_s, strict=False),
            sr,
            data.num_mel_bins,
            data.mel_win_ms,
            data.mel_hop_ms,
        )

    video_embs, audio_embs = [], {k: [] for k in kinds}
    batch_v, batch_a, valid = [], {k: [] for k in kinds}, {k: [] for k in kinds}
    num_skipped = 0

    def flush():
        if not batch_v:
            return
        with torch.no_grad():
            v = model.encode_video(torch.stack(batch_v).to(device)).float()
            video_embs.append(v.cpu())
            for k in kinds:
                a = model.encode_audio(torch.stack(batch_a[k]).to(device)).float()
                audio_embs[k].append(a.cpu())
        batch_v.clear()
        for k in kinds:
            batch_a[k].clear()

    for row in tqdm(rows, desc=f"{job} pairs", disable=not ev.progress, unit="clip"):
        row = int(row)
        rng = np.random.default_rng((ev.seed, row))
        last = float(idx.duration[row]) - clip_s
        t_v = float(rng.uniform(0, max(last, 0.0)))
        media = read_member(fs, idx, row, "mp4")
        try:
            video = decode_video(media, t_v, data.num_frames, data.fps, data.size, False)
            wave = decode_audio(media, data.sample_rate)
        except DecodeError:
            num_skipped += 1
            continue
        starts = {
            "pos": t_v,
            "hard": _audio_start(rng, t_v, clip_s, last, clip_s, 1e9),
            "superhard": _audio_start(rng, t_v, clip_s, last, data.min_shift, clip_s),
        }
        for o in offsets:
            starts[f"off{o:g}"] = _audio_start(rng, t_v, clip_s, last, o, o + 1e-6)
        batch_v.append(video)
        for k in kinds:
            t = starts[k]
            valid[k].append(t is not None)
            batch_a[k].append(mel(wave, data.sample_rate, t if t is not None else t_v))
        if len(batch_v) >= ev.batch_size:
            flush()
    flush()
    if not video_embs:
        raise EvalError(f"{idx.url}: no clip of split {split!r} could be decoded")

    v = torch.cat(video_embs)
    a = {k: torch.cat(audio_embs[k]) for k in kinds}
    # Easy negatives: the next clip's in-sync audio (a different video).
    a["easy"] = torch.roll(a["pos"], shifts=1, dims=0)
    valid_t = {k: torch.tensor(valid[k]) for k in kinds}
    valid_t["easy"] = torch.ones(len(v), dtype=torch.bool)

    def score(audio):  # higher = more in sync
        if fusion:
            with torch.no_grad():
                return model.heads["fusion"](v.to(device), audio.to(device)).float().cpu()
        va, aa = (
            (F.normalize(v, dim=1), F.normalize(audio, dim=1)) if cfg.loss.normalize else (v, audio)
        )
        return -(va - aa).norm(dim=1)

    cut = 0.0 if fusion else -threshold
    s_pos = score(a["pos"])
    tpr = float((s_pos > cut).float().mean())
    metrics: dict[str, float] = {
        "tpr": tpr,
        "num_clips": float(len(v)),
        "num_skipped": float(num_skipped),
        "threshold": float(threshold),
    }
    curve = []
    for k in ["easy", "hard", "superhard", *[f"off{o:g}" for o in offsets]]:
        m = valid_t[k]
        if not bool(m.any()):
            continue
        s_neg = score(a[k])[m]
        tnr = float((s_neg <= cut).float().mean())
        pair = float((s_pos[m] > s_neg).float().mean())
        name = k if not k.startswith("off") else f"offset_{k[3:]}s"
        metrics[f"acc_{name}"] = 0.5 * (tpr + tnr)
        metrics[f"reject_{name}"] = tnr
        metrics[f"pair_acc_{name}"] = pair
        metrics[f"num_{name}"] = float(m.sum())
        if k.startswith("off"):
            curve.append((float(k[3:]), 0.5 * (tpr + tnr), pair, int(m.sum())))
    metrics["acc"] = metrics["acc_easy"]
    log(metrics)
    # Accuracy against offset as a metric history too (step = offset in ms), for avts compare.
    for o, acc, pair, _ in curve:
        log({"acc_vs_offset": acc, "pair_acc_vs_offset": pair}, step=int(round(o * 1000)))
    _write_curve(out_dir, curve, metrics)
    return metrics


def _write_curve(out_dir: Path, curve, metrics) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "sync_vs_offset.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["offset_s", "balanced_acc", "pair_acc", "num_pairs"])
        w.writerows(curve)
    with (out_dir / "sync_per_kind.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kind", "balanced_acc", "reject_rate", "pair_acc", "num_pairs"])
        for k in ("easy", "hard", "superhard"):
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
    fig, ax = plt.subplots(figsize=(5, 3.5))
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
    plt.close(fig)
