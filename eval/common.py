"""What every evaluation runner shares: the runtime options, clip datasets read from shards,
frozen audio features, linear classifiers, metrics and artifacts.

Memory stays bounded: clips are decoded per batch from byte-range reads, features are kept as
one small vector per clip, and nothing holds a decoded video longer than its batch.
"""

from __future__ import annotations

import csv
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from matplotlib.figure import Figure
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from avts_dist.config import DataConfig, EvalConfig
from avts_dist.data import DatasetIndex, read_member
from avts_dist.data.decode import DecodeError, audio_window, decode_audio, decode_video, logmel
from avts_dist.data.decoders import resolve_video_decoder
from eval.registry import EvalError

__all__ = [
    "EvalRuntime",
    "JobIO",
    "MetricSink",
    "VideoClips",
    "audio_features",
    "confusion",
    "fit_linear",
    "prefixed",
    "video_loader",
    "write_class_artifacts",
]


class MetricSink(Protocol):
    """Where a runner reports metrics (the MLflow child run, prefixed with the job name)."""

    def __call__(self, metrics: dict[str, float], step: int = 0) -> None: ...


def prefixed(log: MetricSink, prefix: str) -> MetricSink:
    def sink(metrics: dict[str, float], step: int = 0) -> None:
        log({f"{prefix}{k}": v for k, v in metrics.items()}, step)

    return sink


@dataclass(frozen=True)
class EvalRuntime:
    """How a runner runs (not what it measures): device, batches, workers, seed, progress bars."""

    device: torch.device
    batch_size: int = 16
    num_workers: int = 0
    seed: int = 0
    progress: bool = False

    @classmethod
    def from_config(cls, ev: EvalConfig) -> EvalRuntime:
        device = ev.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        # tqdm off a terminal writes every update into the log: bars only on one.
        progress = ev.progress and sys.stderr.isatty()
        return cls(torch.device(device), ev.batch_size, ev.num_workers, ev.seed, progress)


@dataclass(frozen=True)
class JobIO:
    """What a runner reads and writes: the dataset index, how its clips are decoded (the
    pretraining data geometry), the runtime, where artifacts go and where metrics go."""

    idx: DatasetIndex
    data: DataConfig
    rt: EvalRuntime
    out_dir: Path
    log: MetricSink
    title: str

    def part(self, name: str) -> JobIO:
        """A part of the job (the synthetic job's ``video`` / ``audio``): its own artifact
        folder and metric prefix."""
        return dataclasses.replace(
            self,
            out_dir=self.out_dir / name,
            log=prefixed(self.log, f"{name}/"),
            title=f"{self.title} {name}",
        )


# ---------------------------------------------------------------------------------------------
# Clips


class VideoClips(Dataset):
    """Labelled video clips: one random clip per video (``train``) or ``clips_per_video`` evenly
    spaced clips (evaluation). Items: ``(video_CTHW, label, video_position)``; ``with_audio``:
    ``((video_CTHW, logmel_1FT), label, video_position)``, the log-mel of the same window (of
    silence when the clip's audio cannot be decoded)."""

    def __init__(
        self,
        idx: DatasetIndex,
        rows: np.ndarray,
        data: DataConfig,
        train: bool,
        clips_per_video: int = 1,
        seed: int = 0,
        with_audio: bool = False,
    ) -> None:
        self.idx, self.rows, self.data, self.train = idx, rows, data, train
        self.per_video = 1 if train else clips_per_video
        self.seed = seed
        self.with_audio = with_audio
        self.epoch = 0
        self._fs = None
        # Checked here, in the main process: a decoder that cannot load fails now, not per clip.
        self.video_decoder = resolve_video_decoder(data.video_decoder)

    def __len__(self) -> int:
        return len(self.rows) * self.per_video

    def __getitem__(self, i: int):
        if self._fs is None:  # one filesystem per worker process
            self._fs = self.idx.open_fs()
        pos, j = divmod(i, self.per_video)
        row = int(self.rows[pos])
        clip_s = self.data.clip_seconds
        room = max(0.0, float(self.idx.duration[row]) - clip_s - 1e-3)
        rng = np.random.default_rng((self.seed, self.epoch, row))
        if self.train:
            start = float(rng.uniform(0, room))
        else:
            start = room * (j + 0.5) / self.per_video
        data = read_member(self._fs, self.idx, row, "mp4")
        video = decode_video(
            data,
            start,
            self.data.num_frames,
            self.data.fps,
            self.data.size,
            self.train,
            rng,
            decoder=self.video_decoder,
        )
        if self.with_audio:
            video = (video, self._logmel(data, start))
        return video, int(self.idx.label[row]), pos

    def _logmel(self, mp4: bytes, start: float) -> torch.Tensor:
        d = self.data
        try:
            wave = audio_window(
                decode_audio(mp4, d.sample_rate), d.sample_rate, start, d.clip_seconds
            )
        except DecodeError:
            wave = np.zeros(int(round(d.clip_seconds * d.sample_rate)), dtype=np.float32)
        return logmel(wave, d.sample_rate, d.num_mel_bins, d.mel_win_ms, d.mel_hop_ms)


def video_loader(
    ds: VideoClips, batch_size: int, shuffle: bool, num_workers: int, seed: int
) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=g,
        persistent_workers=False,
    )


@torch.no_grad()
def audio_features(
    net: torch.nn.Module,
    idx: DatasetIndex,
    rows: np.ndarray,
    data: DataConfig,
    *,
    layer: str,
    num_windows: int,
    rt: EvalRuntime,
    desc: str = "audio features",
) -> tuple[np.ndarray, int]:
    """Frozen, pooled features ``[len(rows), C]``: log-mel windows of ``data.clip_seconds``
    evenly spread over each clip, passed through ``layer`` and averaged. Also returns the number
    of clips whose audio could not be decoded (their features are those of silence)."""
    fs = idx.open_fs()
    device = rt.device
    net.eval().to(device)
    num_failed = 0
    win_s = data.clip_seconds
    out: list[np.ndarray] = []
    pending: list[torch.Tensor] = []

    def flush() -> None:
        if pending:
            x = torch.stack(pending).to(device)  # [B*W, 1, F, T]
            feats = net.features(x, layer=layer, pooled=True).float().cpu()
            out.append(feats.view(-1, num_windows, feats.shape[-1]).mean(1).numpy())
            pending.clear()

    for row in tqdm(rows, desc=desc, disable=not rt.progress, unit="clip"):
        row = int(row)
        data_bytes = read_member(fs, idx, row, idx.media_ext(row))
        try:
            wave = decode_audio(data_bytes, data.sample_rate)
        except DecodeError:
            num_failed += 1
            wave = np.zeros(int(win_s * data.sample_rate), dtype=np.float32)
        n = int(round(win_s * data.sample_rate))
        if wave.size < n:
            wave = np.pad(wave, (0, n - wave.size))
        starts = np.linspace(0, wave.size - n, num_windows).astype(int)
        for s in starts:
            pending.append(
                logmel(
                    wave[s : s + n],
                    data.sample_rate,
                    data.num_mel_bins,
                    data.mel_win_ms,
                    data.mel_hop_ms,
                )
            )
        if len(pending) >= rt.batch_size * num_windows:
            flush()
    flush()
    feats = np.concatenate(out) if out else np.zeros((0, 1), dtype=np.float32)
    return feats, num_failed


# ---------------------------------------------------------------------------------------------
# Classifiers and metrics


def fit_linear(
    kind: Literal["svm", "logreg"],
    x_train: np.ndarray,
    y_train: np.ndarray,
    c: float,
    seed: int = 0,
):
    """A standardised linear SVM or logistic regression (scikit-learn, installed with MLflow)."""
    if kind == "svm":
        clf = LinearSVC(C=c, max_iter=5000, random_state=seed)
    else:
        clf = LogisticRegression(C=c, max_iter=2000, random_state=seed)
    model = make_pipeline(StandardScaler(), clf)
    if len(set(y_train.tolist())) < 2:
        raise EvalError("the training fold has a single class; a classifier needs two or more")
    model.fit(x_train, y_train)
    return model


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y_true.astype(int), y_pred.astype(int)), 1)
    return cm


def write_class_artifacts(
    out_dir: Path, prefix: str, cm: np.ndarray, classes: list[str], title: str
) -> None:
    """``<prefix>_confusion.png`` and ``<prefix>_per_class.csv`` (class, support, correct, acc)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    support = cm.sum(1)
    with (out_dir / f"{prefix}_per_class.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "support", "correct", "accuracy"])
        for i, name in enumerate(classes):
            acc = cm[i, i] / support[i] if support[i] else float("nan")
            w.writerow([name, int(support[i]), int(cm[i, i]), f"{acc:.4f}"])
    n = len(classes)
    side = min(2 + 0.35 * n, 20)
    fig = Figure(figsize=(side, side))  # not pyplot: no GUI backend, no global figure state
    ax = fig.subplots()
    norm = cm / np.maximum(support[:, None], 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if n <= 60:
        ax.set_xticks(range(n), classes, rotation=90, fontsize=6)
        ax.set_yticks(range(n), classes, fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / f"{prefix}_confusion.png", dpi=100)
