"""Low-label evaluation of the video net: the study's protocol (docs/results.md 1.3 and 1.6).

For each fine-tuning seed ``f`` and ``k`` labelled clips per class (``k = 0``: all), the k-shot set
takes per class the first ``k`` of a permutation of that class's ``eval_train`` clips drawn from
``numpy.random.default_rng([f, class])``, so the sets are nested in ``k`` and the same for every
net. Every cell is scored on all of ``eval_test``: class probabilities averaged over
``test_windows`` evenly spaced windows per clip, argmax against the label.

- ``finetune``: the video net + dropout + a linear head, all trained with AdamW and a cosine
  schedule over a fixed number of optimizer steps (``steps`` batches of ``eval.batch_size``
  random windows, cycling through the k-shot set: 1-shot and all-shot get the same compute).
- ``probe``: the frozen net's pooled ``pool`` features (training clips: the mean over
  ``probe_windows`` windows; test clips: each window alone), standardised, logistic regression.
  Features are extracted once per net and reused by every (k, f).
- ``multimodal`` (T3): both modalities, the same fine-tuning; early fusion trains its whole net
  with a new head on the shared trunk (``FusedClassifier``), two-stream trains both nets with a
  linear head on their concatenated pooled features (``ConcatClassifier``).
- ``silent_audio`` (T3, early fusion only): the same, the audio branch fed the log-mel of silence.
- ``scratch``: the same recipes from a random init of the same architecture (seed ``eval.seed``).

``finetune`` and ``probe`` of an early-fusion export use its ``video`` weights in a plain video net
(its stem and every stage; the later stages then run without the audio they were trained with):
see docs/evaluation.md.

Metrics: ``<label_set>/<recipe>/<init>/k<k>/f<f>/acc`` (``k`` as ``all`` for 0), logged as each
cell finishes, and ``lowlabel.json`` in the job's folder with the same cells.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import torch
from torch.utils.data import Dataset

from avts_dist.config import LowLabelConfig
from avts_dist.data import DatasetIndex
from avts_dist.data.synthetic import use_label_set
from avts_dist.models import ConcatClassifier, FusedClassifier, VideoClassifier, silent_logmel
from eval.action import predict_videos, train_classifier
from eval.common import JobIO, VideoClips, fit_linear, video_loader
from eval.pretrained import Pretrained
from eval.registry import EvalError
from eval.splits import SplitPlan

__all__ = [
    "StepClips",
    "cell_metric",
    "check_pool",
    "kshot_rows",
    "probe_accuracy",
    "run_lowlabel",
    "shot_name",
    "window_features",
]

INITS = ("pretrained", "scratch")
# Recipes that train a network (the probe fits on frozen features).
FINETUNE_RECIPES = ("finetune", "multimodal", "silent_audio")


def shot_name(k: int) -> str:
    return "all" if k == 0 else str(k)


def cell_metric(label_set: str, recipe: str, init: str, k: int, f: int) -> str:
    """A cell's metric name inside the job (MLflow prefixes ``lowlabel/``)."""
    return f"{label_set}/{recipe}/{init}/k{shot_name(k)}/f{f}/acc"


def check_pool(labels_R: np.ndarray, pool_rows: np.ndarray, shots: list[int], classes: list[str]):
    """Every class has at least max(shots) clips in the labelled pool (before any training)."""
    need = max(shots)
    counts = np.bincount(labels_R[pool_rows], minlength=len(classes))
    short = [f"{c} has {n}" for c, n in zip(classes, counts, strict=True) if n < max(need, 1)]
    if short:
        raise EvalError(
            f"eval.lowlabel.shots={shots} needs {max(need, 1)} eval_train clips per class; "
            + ", ".join(short)
        )


def kshot_rows(labels_R: np.ndarray, pool_rows: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The k-shot set of seed ``seed`` (index rows, sorted): per class ``c``, the first ``k`` of
    ``default_rng([seed, c]).permutation`` of the class's pool rows; ``k = 0``: the whole pool."""
    pool_rows = np.sort(np.asarray(pool_rows, dtype=np.int64))
    if k == 0:
        return pool_rows
    chosen = []
    for c in np.unique(labels_R[pool_rows]):
        rows_c = pool_rows[labels_R[pool_rows] == c]
        chosen.append(np.random.default_rng([seed, int(c)]).permutation(rows_c)[:k])
    return np.sort(np.concatenate(chosen))


class StepClips(Dataset):
    """``num_items`` random training windows cycling through ``clips``: each pass over the clips
    in a new order (``default_rng([seed, pass])``) with new windows (``VideoClips.epoch``)."""

    def __init__(self, clips: VideoClips, num_items: int, seed: int) -> None:
        self.clips = clips
        n = len(clips)
        passes = math.ceil(num_items / n)
        self.order = [
            (e, int(pos))
            for e in range(passes)
            for pos in np.random.default_rng([seed, e]).permutation(n)
        ][:num_items]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int):
        epoch, pos = self.order[i]
        self.clips.epoch = epoch  # each DataLoader worker holds its own copy
        return self.clips[pos]


@torch.no_grad()
def window_features(
    net: torch.nn.Module,
    idx: DatasetIndex,
    rows: np.ndarray,
    io: JobIO,
    num_windows: int,
    desc: str,
) -> np.ndarray:
    """Pooled ``pool`` features ``[len(rows), num_windows, C]`` of evenly spaced windows."""
    rt = io.rt
    net.eval().to(rt.device)
    ds = VideoClips(idx, rows, io.data, train=False, clips_per_video=num_windows, seed=rt.seed)
    feats = [
        net.features(video_BCTHW.to(rt.device), layer="pool", pooled=True).float().cpu().numpy()
        for video_BCTHW, _, _ in video_loader(ds, rt.batch_size, False, rt.num_workers, rt.seed)
    ]
    return np.concatenate(feats).reshape(len(rows), num_windows, -1)


def probe_accuracy(
    train_RC: np.ndarray,
    train_labels: np.ndarray,
    test_RWC: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    c: float,
    seed: int,
) -> float:
    """Logistic regression on standardised training features; each test clip's class
    probabilities averaged over its windows."""
    clf = fit_linear("logreg", train_RC, train_labels, c, seed)
    num_test, num_windows, dim = test_RWC.shape
    probs = np.zeros((num_test * num_windows, num_classes))
    probs[:, clf.classes_] = clf.predict_proba(test_RWC.reshape(-1, dim))
    clip_probs = probs.reshape(num_test, num_windows, num_classes).mean(1)
    return float((clip_probs.argmax(1) == test_labels).mean())


class _SilentAudio(torch.nn.Module):
    """An audio-visual classifier whose audio input is replaced by the log-mel of silence."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, video_BCTHW: torch.Tensor, logmel_B1FT: torch.Tensor) -> torch.Tensor:
        return self.inner(video_BCTHW, silent_logmel(logmel_B1FT))


def build_classifier(
    recipe: str,
    pre: Pretrained,
    num_classes: int,
    dropout: float,
    *,
    init: str,
    seed: int,
    head_seed: int,
) -> torch.nn.Module:
    """The network a fine-tuning recipe trains: the pretrained weights (``init=pretrained``) or
    the same architecture from a random init of ``seed``; its new head drawn from ``head_seed``.
    ``finetune``: the video net; ``multimodal``: early fusion's trunk (``FusedClassifier``) or
    both two-stream nets (``ConcatClassifier``); ``silent_audio``: early fusion fed silence."""
    pretrained = init == "pretrained"
    if recipe == "finetune":
        video = pre.video_net(pretrained, seed)
        torch.manual_seed(head_seed)
        return VideoClassifier(video, num_classes, dropout=dropout)
    if pre.model_cfg.arch == "early_fusion":
        model = pre.model(pretrained, seed)
        torch.manual_seed(head_seed)
        fused = FusedClassifier(model, num_classes, dropout=dropout)
        return fused if recipe == "multimodal" else _SilentAudio(fused)
    video, audio = pre.video_net(pretrained, seed), pre.audio_net(pretrained)
    torch.manual_seed(head_seed)
    return ConcatClassifier(video, audio, num_classes, dropout=dropout)


def _finetune_cell(
    cfg: LowLabelConfig,
    pre: Pretrained,
    idx: DatasetIndex,
    rows: np.ndarray,
    test_rows: np.ndarray,
    io: JobIO,
    *,
    recipe: str,
    init: str,
    f: int,
    desc: str,
) -> float:
    # The nets: the pretrained weights, or a random init of seed eval.seed (r); the head, the
    # windows, augmentation and batch order: the fine-tuning seed f.
    net = build_classifier(
        recipe, pre, len(idx.classes), cfg.dropout, init=init, seed=io.rt.seed, head_seed=f
    )
    rt = dataclasses.replace(io.rt, seed=f)
    torch.manual_seed(f)  # dropout masks
    with_audio = recipe != "finetune"
    clips = StepClips(
        VideoClips(idx, rows, io.data, train=True, seed=f, with_audio=with_audio),
        cfg.steps * rt.batch_size,
        seed=f,
    )
    train_classifier(
        net,
        video_loader(clips, rt.batch_size, False, rt.num_workers, f),
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        total_steps=cfg.steps,
        rt=rt,
        desc=desc,
    )
    _, acc, _, _ = predict_videos(
        net,
        idx,
        test_rows,
        data=io.data,
        rt=rt,
        clips_per_video=cfg.test_windows,
        desc=desc,
        with_audio=with_audio,
    )
    return acc


def run_lowlabel(
    cfg: LowLabelConfig, pre: Pretrained, plans: list[SplitPlan], io: JobIO
) -> dict[str, float]:
    """Every (recipe, init, k, f) cell of ``cfg`` on the eval_train -> eval_test plan."""
    if "eval_train" not in io.idx.splits or len(plans) != 1:
        raise EvalError(
            f"{io.idx.url}: the low-label job needs eval_train/eval_test splits "
            "(avts synth --eval-train-fraction/--eval-test-fraction)"
        )
    try:
        idx = use_label_set(io.idx, cfg.label_set)
    except ValueError as exc:
        raise EvalError(f"eval.lowlabel.label_set: {exc}") from None
    if "silent_audio" in cfg.recipes and pre.model_cfg.arch != "early_fusion":
        raise EvalError(
            "eval.lowlabel.recipes: silent_audio feeds an early-fusion net silence; this "
            f"checkpoint is model.arch={pre.model_cfg.arch} (its video-only recipe is finetune)"
        )
    (plan,) = plans
    labels_R = idx.label.astype(np.int64)
    check_pool(labels_R, plan.train_rows, cfg.shots, idx.classes)
    test_rows, test_labels = plan.test_rows, labels_R[plan.test_rows]
    inits = ["pretrained"] + (["scratch"] if cfg.scratch else [])
    metrics: dict[str, float] = {}
    cells: list[dict] = []
    record = {
        "label_set": cfg.label_set,
        "classes": idx.classes,
        "init_seed": io.rt.seed,
        "config": dataclasses.asdict(cfg),
        "batch_size": io.rt.batch_size,
        "num_eval_train": int(plan.train_rows.size),
        "num_eval_test": int(test_rows.size),
        "cells": cells,
    }

    def add(recipe: str, init: str, k: int, f: int, rows: np.ndarray, acc: float) -> None:
        name = cell_metric(cfg.label_set, recipe, init, k, f)
        metrics[name] = acc
        io.log({name: acc})
        cells.append(
            {
                "metric": f"{io.title}/{name}",
                "recipe": recipe,
                "init": init,
                "k": shot_name(k),
                "f": f,
                "num_train_clips": int(rows.size),
                "acc": acc,
            }
        )
        # Rewritten after every cell: a job stopped midway keeps what it measured.
        (io.out_dir / "lowlabel.json").write_text(json.dumps(record, indent=1))

    for init in inits:
        if "probe" in cfg.recipes:
            net = pre.video_net(pretrained=init == "pretrained", seed=io.rt.seed)
            pool_feats = window_features(
                net, idx, plan.train_rows, io, cfg.probe_windows, f"{init} features"
            ).mean(1)
            test_feats = window_features(
                net, idx, test_rows, io, cfg.test_windows, f"{init} test features"
            )
            where = {int(r): i for i, r in enumerate(plan.train_rows)}
            for k in cfg.shots:
                for f in cfg.seeds:
                    rows = kshot_rows(labels_R, plan.train_rows, k, f)
                    acc = probe_accuracy(
                        pool_feats[[where[int(r)] for r in rows]],
                        labels_R[rows],
                        test_feats,
                        test_labels,
                        len(idx.classes),
                        cfg.c,
                        f,
                    )
                    add("probe", init, k, f, rows, acc)
        for recipe in (r for r in FINETUNE_RECIPES if r in cfg.recipes):
            for k in cfg.shots:
                for f in cfg.seeds:
                    rows = kshot_rows(labels_R, plan.train_rows, k, f)
                    desc = f"{cfg.label_set} {recipe} {init} k{shot_name(k)} f{f}"
                    acc = _finetune_cell(
                        cfg, pre, idx, rows, test_rows, io, recipe=recipe, init=init, f=f, desc=desc
                    )
                    add(recipe, init, k, f, rows, acc)
    return metrics
