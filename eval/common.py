"""What every evaluation job shares: the pretrained weights, clip datasets read from shards,
split plans, classifiers, metrics and artifacts.

Memory stays bounded: clips are decoded per batch from byte-range reads, features are kept as
one small vector per clip, and nothing holds a decoded video longer than its batch.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import dataclasses
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from avts_dist.config import Config, DataConfig, ModelConfig

__all__ = [
    "EvalError",
    "Pretrained",
    "SplitPlan",
    "VideoClips",
    "audio_features",
    "fit_linear",
    "load_pretrained",
    "pick_device",
    "split_plans",
    "write_class_artifacts",
]

ARCH_FIELDS = (
    "video_arch",
    "video_width",
    "video_layers",
    "audio_arch",
    "audio_width",
    "embed_dim",
)


class EvalError(ValueError):
    """A user-facing evaluation problem (bad checkpoint, dataset, split); one line."""


# ---------------------------------------------------------------------------------------------
# Pretrained weights


@dataclass
class Pretrained:
    export_path: str
    payload: dict[str, Any]
    model_cfg: ModelConfig
    run_dir: Path | None
    mlflow_run_id: str

    def video_net(self, pretrained: bool = True, seed: int = 0) -> torch.nn.Module:
        from avts_dist.models import build_video_net

        torch.manual_seed(seed)
        net = build_video_net(self.model_cfg)
        if pretrained:
            _load(net, self.payload["video"], "video", self.export_path)
        return net

    def audio_net(self) -> torch.nn.Module:
        from avts_dist.models import build_audio_net

        net = build_audio_net(self.model_cfg)
        _load(net, self.payload["audio"], "audio", self.export_path)
        return net

    def model(self) -> torch.nn.Module:
        from avts_dist.models import build_model

        model = build_model(self.model_cfg)
        _load(model.video, self.payload["video"], "video", self.export_path)
        _load(model.audio, self.payload["audio"], "audio", self.export_path)
        _load(model.heads, self.payload["heads"], "heads", self.export_path)
        return model


def _load(module: torch.nn.Module, state: dict, what: str, path: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise EvalError(
            f"checkpoint {path} does not match the model config ({what} weights): "
            f"{' '.join(lines[1:3])[:300]}"
        ) from None


def _find_run_dir(start: Path) -> Path | None:
    """The run dir holds ``mlflow_run_id`` / ``config.yaml``; checkpoints sit below it."""
    candidates = [start, *start.parents][:5]
    for marker in ("mlflow_run_id", "config.yaml"):
        for p in candidates:
            if (p / marker).is_file():
                return p
    return None


def _export_checkpoint_dir(ckpt: Path, out: Path) -> Path:
    """A DeepSpeed checkpoint dir becomes an export through ``avts export`` (the trainer's)."""
    from avts_dist.cli import main as avts_main

    target = out / "model.pt"
    # Its messages go to stderr: stdout belongs to `avts eval` (e.g. --json).
    with contextlib.redirect_stdout(sys.stderr):
        rc = avts_main(["export", "--checkpoint", str(ckpt), "--out", str(target)])
    if rc != 0 or not target.exists():
        raise EvalError(f"cannot export checkpoint dir {ckpt} (avts export exit status {rc})")
    return target


def check_model_match(pre: Pretrained, cfg: Config, explicit_model_keys: set[str]) -> None:
    """Model keys the user set explicitly (overrides, --config) must equal the checkpoint's."""
    mismatched = [
        f"model.{k}={getattr(cfg.model, k)!r} but the checkpoint has {getattr(pre.model_cfg, k)!r}"
        for k in ARCH_FIELDS
        if k in explicit_model_keys and getattr(cfg.model, k) != getattr(pre.model_cfg, k)
    ]
    if mismatched:
        raise EvalError(
            f"checkpoint {pre.export_path} does not match the config: {'; '.join(mismatched)}"
        )


def load_pretrained(checkpoint: str) -> Pretrained:
    """Resolves ``--checkpoint`` (an exported ``.pt`` or a checkpoint dir), its run dir and the
    pretraining run's MLflow id."""
    from avts_dist.models import ExportError, load_exported, model_config_from_export

    if not checkpoint:
        raise EvalError("no checkpoint: pass --checkpoint <checkpoint dir or exported .pt>")
    path = Path(checkpoint)
    local = "://" not in checkpoint
    if local and not path.exists():
        raise EvalError(f"checkpoint not found: {checkpoint}")
    if local and path.is_dir():
        tmp = tempfile.mkdtemp(prefix="avts-eval-")
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        export_path = str(_export_checkpoint_dir(path, Path(tmp)))
    else:
        export_path = checkpoint
    try:
        payload = load_exported(export_path)
        model_cfg = model_config_from_export(payload)
    except ExportError as exc:
        raise EvalError(str(exc)) from None
    run_dir = None
    run_id = ""
    for start in (path if local else None, payload.get("source_checkpoint")):
        if start:
            run_dir = _find_run_dir(Path(str(start)).resolve())
            if run_dir is not None:
                break
    if run_dir is not None and (run_dir / "mlflow_run_id").exists():
        run_id = (run_dir / "mlflow_run_id").read_text().strip()
    return Pretrained(export_path, payload, model_cfg, run_dir, run_id)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------------------------------------
# Splits


@dataclass
class SplitPlan:
    name: str
    train_rows: np.ndarray
    test_rows: np.ndarray


def _cap(rows: np.ndarray, n: int, seed: int) -> np.ndarray:
    if n and rows.size > n:
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(rows, size=n, replace=False))
    return rows


def split_plans(idx, ev, usable: np.ndarray | None = None) -> list[SplitPlan]:
    """Per-split (UCF101/HMDB51 ``split<k>``), per-fold (ESC-50 ``fold``, DCASE ``fold<k>``)
    or single train/test plan (the index ``split``: ``train`` vs ``test``, else ``val``).

    ``ev`` is the ``EvalConfig``: its ``splits``, ``max_train_videos``, ``max_test_videos`` and
    ``seed`` choose and cap the plans."""
    splits, max_train, max_test, seed = ev.splits, ev.max_train_videos, ev.max_test_videos, ev.seed
    ok = np.zeros(len(idx), dtype=bool)
    ok[idx.rows(status="ok")] = True
    if usable is not None:
        ok &= usable
    cols = set(idx.extra_columns)
    plans: list[SplitPlan] = []

    def add(name: str, train: np.ndarray, test: np.ndarray) -> None:
        plans.append(
            SplitPlan(
                name,
                _cap(np.flatnonzero(train & ok), max_train, seed),
                _cap(np.flatnonzero(test & ok), max_test, seed),
            )
        )

    if {f"split{k}" for k in splits} <= cols:
        for k in splits:
            col = idx.column(f"split{k}")
            add(f"split{k}", col == "train", col == "test")
    elif any(c.startswith("fold") and c[4:].isdigit() for c in cols):
        for c in sorted(c for c in cols if c.startswith("fold") and c[4:].isdigit()):
            col = idx.column(c)
            add(c, col == "train", col == "test")
    elif "fold" in cols:
        fold = idx.column("fold")
        for f in sorted(set(fold.tolist())):
            add(f"fold{f}", fold != f, fold == f)
    else:
        split = idx.split
        test_name = "test" if "test" in idx.splits else "val"
        add("main", split == "train", split == test_name)
    for plan in plans:
        if plan.train_rows.size == 0 or plan.test_rows.size == 0:
            raise EvalError(
                f"{idx.url}: {plan.name} has {plan.train_rows.size} train and "
                f"{plan.test_rows.size} test clips with status ok; both must be > 0"
            )
    return plans


# ---------------------------------------------------------------------------------------------
# Clips


class VideoClips(Dataset):
    """Labelled video clips: one random clip per video (``train``) or ``clips_per_video`` evenly
    spaced clips (evaluation). Items: ``(video_CTHW, label, video_position)``."""

    def __init__(
        self,
        idx,
        rows: np.ndarray,
        data: DataConfig,
        train: bool,
        clips_per_video: int = 1,
        seed: int = 0,
    ) -> None:
        self.idx, self.rows, self.data, self.train = idx, rows, data, train
        self.per_video = 1 if train else clips_per_video
        self.seed = seed
        self.epoch = 0
        self._fs = None

    def __len__(self) -> int:
        return len(self.rows) * self.per_video

    def __getitem__(self, i: int):
        from avts_dist.data.decode import decode_video
        from avts_dist.data.index import read_member

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
            data, start, self.data.num_frames, self.data.fps, self.data.size, self.train, rng
        )
        return video, int(self.idx.label[row]), pos


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
    idx,
    rows: np.ndarray,
    data: DataConfig,
    *,
    layer: str,
    num_windows: int,
    batch_size: int,
    device: torch.device,
    progress: bool = True,
    desc: str = "audio features",
) -> np.ndarray:
    """Frozen, pooled features ``[len(rows), C]``: log-mel windows of ``data.clip_seconds``
    evenly spread over each clip, passed through ``layer`` and averaged."""
    from tqdm.auto import tqdm

    from avts_dist.data.decode import DecodeError, decode_audio, logmel
    from avts_dist.data.index import read_member

    fs = idx.open_fs()
    net.eval().to(device)
    win_s = data.clip_seconds
    out: list[np.ndarray] = []
    pending: list[torch.Tensor] = []

    def flush() -> None:
        if pending:
            x = torch.stack(pending).to(device)  # [B*W, 1, F, T]
            feats = net.features(x, layer=layer, pooled=True).float().cpu()
            out.append(feats.view(-1, num_windows, feats.shape[-1]).mean(1).numpy())
            pending.clear()

    for row in tqdm(rows, desc=desc, disable=not progress, unit="clip"):
        row = int(row)
        data_bytes = read_member(fs, idx, row, idx.media_ext(row))
        try:
            wave = decode_audio(data_bytes, data.sample_rate)
        except DecodeError:
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
        if len(pending) >= batch_size * num_windows:
            flush()
    flush()
    return np.concatenate(out) if out else np.zeros((0, 1), dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Classifiers and metrics


def fit_linear(kind: str, x_train: np.ndarray, y_train: np.ndarray, c: float, seed: int = 0):
    """A standardised linear SVM or logistic regression (scikit-learn, installed with MLflow)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    support = cm.sum(1)
    with (out_dir / f"{prefix}_per_class.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "support", "correct", "accuracy"])
        for i, name in enumerate(classes):
            acc = cm[i, i] / support[i] if support[i] else float("nan")
            w.writerow([name, int(support[i]), int(cm[i, i]), f"{acc:.4f}"])
    n = len(classes)
    fig, ax = plt.subplots(figsize=(min(2 + 0.35 * n, 20), min(2 + 0.35 * n, 20)))
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
    plt.close(fig)


def eval_params(cfg: Config, pre: Pretrained, dataset_url: str) -> dict[str, Any]:
    params = {
        f"eval.{k}": v
        for k, v in dataclasses.asdict(cfg.eval).items()
        if k not in ("datasets", "checkpoint")
    }
    params.update(
        {
            f"data.{k}": getattr(cfg.data, k)
            for k in ("num_frames", "fps", "size", "sample_rate", "num_mel_bins")
        }
    )
    params.update({f"model.{k}": getattr(pre.model_cfg, k) for k in ARCH_FIELDS})
    params["checkpoint"] = pre.export_path
    params["dataset"] = dataset_url
    return params
