"""``eval``: the evaluation jobs' shared knobs and each job's own section."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from avts_dist.config.common import fail

__all__ = [
    "LOWLABEL_RECIPES",
    "EvalConfig",
    "FinetuneConfig",
    "LinearProbeConfig",
    "LowLabelConfig",
    "SyncEvalConfig",
]


@dataclass
class SyncEvalConfig:
    """``avts eval sync``: held-out in-sync pairs against each negative kind and an offset sweep."""

    # Split of the dataset; empty: data.val_split.
    split: str = ""
    # Held-out clips evaluated, evenly spread over the split (0: all of them).
    max_clips: int = 64
    # A pair is in sync when the embedding distance is below this (0: loss.margin / 2). A fusion
    # head's logit > 0 is used instead when the model has one.
    threshold: float = 0.0
    # Offsets (seconds) of the accuracy-vs-offset curve.
    offsets: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 1.5, 2.0])
    # Offset classification (eval/sync_offsets.py): classes -max ... +max seconds in steps of
    # offset_grid_step (21 for 1.0 and 0.1, scaled to 4 s clips); 0 turns it off.
    offset_grid_max: float = 1.0
    offset_grid_step: float = 0.1

    def __post_init__(self) -> None:
        if self.offset_grid_max < 0 or self.offset_grid_step <= 0:
            fail("eval.sync.offset_grid_max", "must be >= 0 (0 = off), with offset_grid_step > 0")
        steps = self.offset_grid_max / self.offset_grid_step
        if abs(steps - round(steps)) > 1e-6:
            fail("eval.sync.offset_grid_max", "must be a whole number of offset_grid_step")
        if self.max_clips < 0:
            fail("eval.sync.max_clips", "must be >= 0 (0 = every clip of the split)")
        if self.threshold < 0:
            fail("eval.sync.threshold", "must be >= 0 (0 = loss.margin / 2)")
        if any(o <= 0 for o in self.offsets):
            fail("eval.sync.offsets", "offsets must be > 0 seconds")


@dataclass
class FinetuneConfig:
    """Fine-tuning the video net with a new linear head (ucf101, hmdb51, multimodal, synthetic)."""

    epochs: int = 5
    lr: float = 1e-3
    weight_decay: float = 1e-4
    dropout: float = 0.5
    # Test clips per video, evenly spaced; video accuracy averages their softmax.
    clips_per_video: int = 3
    # Also train the same architecture from random init with the same recipe.
    scratch_baseline: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "clips_per_video"):
            if getattr(self, name) < 1:
                fail(f"eval.finetune.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            fail("eval.finetune.lr", "must be > 0")
        if not 0 <= self.dropout < 1:
            fail("eval.finetune.dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass
class LinearProbeConfig:
    """A linear classifier on frozen audio features (esc50, dcase2014, multimodal, synthetic)."""

    # Audio net layer whose pooled output is the feature (layer1..layer4, pool).
    feature_layer: str = "pool"
    # multimodal always uses logreg: late fusion needs class probabilities.
    classifier: Literal["svm", "logreg"] = "svm"
    # Inverse regularisation strength (scikit-learn's C).
    c: float = 1.0
    # Log-mel windows of data.clip_seconds per clip, evenly spread; their features are averaged.
    windows: int = 3

    def __post_init__(self) -> None:
        if self.c <= 0:
            fail("eval.probe.c", "must be > 0")
        if self.windows < 1:
            fail("eval.probe.windows", f"must be >= 1, got {self.windows}")


# The low-label job's recipes (eval/lowlabel.py): video-only (finetune, probe) and T3's
# audio-visual ones (multimodal: both modalities; silent_audio: early fusion fed silence).
LOWLABEL_RECIPES = ("finetune", "probe", "multimodal", "silent_audio")


@dataclass
class LowLabelConfig:
    """``avts eval lowlabel``: k labelled clips per class from ``eval_train``, scored on all of
    ``eval_test`` (docs/results.md 1.3 and 1.6). Defaults are the protocol's recipe values."""

    # Labelled clips per class; 0 = every eval_train clip (reported as k "all").
    shots: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 0])
    # Fine-tuning seeds f: the k-shot draw, head init, window sampling, augmentation, batch order.
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # finetune | probe (the video net) | multimodal | silent_audio (early fusion only): T3.
    recipes: list[str] = field(default_factory=lambda: ["finetune", "probe"])
    # The recorded label set (index column label_<name>): rhythm | appearance on the synthetic
    # corpus.
    label_set: str = "rhythm"
    # Also run the recipes from a random init (init seed = eval.seed).
    scratch: bool = False
    # Fine-tune: optimizer steps at eval.batch_size, the same for every k (cosine over them).
    steps: int = 60
    lr: float = 3e-3
    weight_decay: float = 1e-4
    dropout: float = 0.5
    # Probe: scikit-learn logistic regression's C; windows averaged into a training feature.
    c: float = 1.0
    probe_windows: int = 4
    # Evenly spaced test windows per eval_test clip, their probabilities averaged (both recipes).
    test_windows: int = 3

    def __post_init__(self) -> None:
        key = "eval.lowlabel"
        if (
            not self.shots
            or any(k < 0 for k in self.shots)
            or len(set(self.shots)) != len(self.shots)
        ):
            fail(f"{key}.shots", f"distinct values >= 0 (0 = all) expected, got {self.shots}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            fail(f"{key}.seeds", f"distinct seeds expected, got {self.seeds}")
        unknown = [r for r in self.recipes if r not in LOWLABEL_RECIPES]
        if unknown or not self.recipes:
            fail(
                f"{key}.recipes",
                f"a subset of {list(LOWLABEL_RECIPES)} expected, got {self.recipes}",
            )
        for name in ("steps", "probe_windows", "test_windows"):
            if getattr(self, name) < 1:
                fail(f"{key}.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.c <= 0:
            fail(f"{key}.{'lr' if self.lr <= 0 else 'c'}", "must be > 0")
        if not 0 <= self.dropout < 1:
            fail(f"{key}.dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass
class EvalConfig:
    checkpoint: str = ""
    # Dataset URL per evaluation (name -> URL); sync and synthetic default to data.url.
    datasets: dict[str, str] = field(default_factory=dict)
    # UCF101/HMDB51 splits to run (split plans: eval/common.py).
    splits: list[int] = field(default_factory=lambda: [1, 2, 3])
    # Caps for toy runs (0: no cap): training clips per split, and test videos per split.
    max_train_videos: int = 0
    max_test_videos: int = 0
    batch_size: int = 16
    num_workers: int = 0
    # auto (cuda when available) | cpu | cuda | cuda:N
    device: str = "auto"
    seed: int = 0
    progress: bool = True
    # MLflow parent run; empty: read <run dir>/mlflow_run_id next to the checkpoint.
    parent_run_id: str = ""
    # Local folder for artifacts (plots, CSVs); empty: <run dir or cwd>/eval/<name>.
    out_dir: str = ""
    sync: SyncEvalConfig = field(default_factory=SyncEvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    probe: LinearProbeConfig = field(default_factory=LinearProbeConfig)
    lowlabel: LowLabelConfig = field(default_factory=LowLabelConfig)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            fail("eval.batch_size", f"must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            fail("eval.num_workers", "must be >= 0")
        if self.max_train_videos < 0 or self.max_test_videos < 0:
            fail("eval.max_train_videos", "caps must be >= 0 (0 = no cap)")
        if any(k not in (1, 2, 3) for k in self.splits) or not self.splits:
            fail("eval.splits", f"must be a non-empty subset of [1, 2, 3], got {self.splits}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            fail("eval.device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
