"""Audio classification on frozen features (ESC-50, DCASE2014, the synthetic labels).

No fine-tuning: the pretrained audio net gives pooled features from
``eval.probe.feature_layer`` (averaged over ``eval.probe.windows`` log-mel windows per clip); a
linear SVM or logistic regression is trained per official fold and the accuracy is averaged over
folds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from avts_dist.config import LinearProbeConfig
from eval.common import (
    JobIO,
    audio_features,
    confusion,
    fit_linear,
    write_class_artifacts,
)
from eval.registry import EvalError
from eval.splits import SplitPlan

__all__ = ["ProbeFold", "check_feature_layer", "probe_folds", "run_probe"]


@dataclass
class ProbeFold:
    name: str
    y_true: np.ndarray
    y_pred: np.ndarray

    @property
    def acc(self) -> float:
        return float((self.y_pred == self.y_true).mean())


def probe_folds(
    features_RC: np.ndarray,
    labels_R: np.ndarray,
    plans: list[SplitPlan],
    cfg: LinearProbeConfig,
    seed: int = 0,
) -> list[ProbeFold]:
    """One linear classifier per plan on frozen features; ``features_RC`` and ``labels_R`` are
    indexed by index row."""
    folds = []
    for plan in plans:
        clf = fit_linear(
            cfg.classifier, features_RC[plan.train_rows], labels_R[plan.train_rows], cfg.c, seed
        )
        pred = clf.predict(features_RC[plan.test_rows])
        folds.append(ProbeFold(plan.name, labels_R[plan.test_rows], pred))
    return folds


def check_feature_layer(net: torch.nn.Module, layer: str) -> None:
    if layer not in net.stage_names:
        raise EvalError(
            f"eval.probe.feature_layer={layer!r} is not a layer of the audio net "
            f"(choose from {net.stage_names})"
        )


def run_probe(
    cfg: LinearProbeConfig, net: torch.nn.Module, plans: list[SplitPlan], io: JobIO
) -> dict[str, float]:
    """Linear probe of the audio net ``net`` over ``plans``; returns the metrics it logged."""
    idx, rt, log = io.idx, io.rt, io.log
    check_feature_layer(net, cfg.feature_layer)
    # Each clip's features are computed once, whatever number of folds use it.
    needed = np.unique(np.concatenate([np.r_[p.train_rows, p.test_rows] for p in plans]))
    feats, num_failed = audio_features(
        net,
        idx,
        needed,
        io.data,
        layer=cfg.feature_layer,
        num_windows=cfg.windows,
        rt=rt,
        desc=f"{io.title} features",
    )
    features_RC = np.zeros((len(idx), feats.shape[1]), dtype=feats.dtype)
    features_RC[needed] = feats
    folds = probe_folds(features_RC, idx.label.astype(np.int64), plans, cfg, rt.seed)
    metrics: dict[str, float] = {
        "feature_dim": float(feats.shape[1]),
        "num_audio_decode_errors": float(num_failed),
    }
    cm_total = np.zeros((len(idx.classes), len(idx.classes)), dtype=np.int64)
    for fold in folds:
        metrics[f"{fold.name}/acc"] = fold.acc
        log({f"{fold.name}/acc": fold.acc})
        cm_total += confusion(fold.y_true, fold.y_pred, len(idx.classes))
    accs = [fold.acc for fold in folds]
    metrics["acc"] = float(np.mean(accs))
    metrics["acc_std"] = float(np.std(accs))
    metrics["num_folds"] = float(len(folds))
    log(
        {
            k: metrics[k]
            for k in ("acc", "acc_std", "num_folds", "feature_dim", "num_audio_decode_errors")
        }
    )
    write_class_artifacts(
        io.out_dir,
        "folds",
        cm_total,
        idx.classes,
        f"{io.title} {cfg.classifier} on {cfg.feature_layer}: "
        f"{metrics['acc']:.3f} over {len(folds)} folds",
    )
    return metrics
