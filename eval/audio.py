"""Audio classification on frozen features (ESC-50, DCASE2014, the synthetic labels).

No fine-tuning: the pretrained audio net gives pooled features from ``eval.feature_layer``
(averaged over ``eval.audio_windows`` log-mel windows per clip); a linear SVM or logistic
regression is trained per official fold and the accuracy is averaged over folds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from eval.common import (
    audio_features,
    confusion,
    fit_linear,
    pick_device,
    split_plans,
    write_class_artifacts,
)

__all__ = ["run_audio"]


def run_audio(job: str, cfg, pre, idx, out_dir: Path, log) -> dict[str, float]:
    ev = cfg.eval
    device = pick_device(ev.device)
    net = pre.audio_net()
    if ev.feature_layer not in net.stage_names:
        from eval.common import EvalError

        raise EvalError(
            f"eval.feature_layer={ev.feature_layer!r} is not a layer of the audio net "
            f"(choose from {net.stage_names})"
        )
    plans = split_plans(idx, ev, usable=idx.has_audio.astype(bool))
    # Each clip's features are computed once, whatever number of folds use it.
    needed = np.unique(np.concatenate([np.r_[p.train_rows, p.test_rows] for p in plans]))
    feats = audio_features(
        net,
        idx,
        needed,
        cfg.data,
        layer=ev.feature_layer,
        num_windows=ev.audio_windows,
        batch_size=ev.batch_size,
        device=device,
        progress=ev.progress,
        desc=f"{job} features",
    )
    where = {int(r): i for i, r in enumerate(needed)}
    labels = idx.label.astype(np.int64)
    accs = []
    cm_total = np.zeros((len(idx.classes), len(idx.classes)), dtype=np.int64)
    metrics: dict[str, float] = {"feature_dim": float(feats.shape[1])}
    for plan in plans:
        xtr = feats[[where[int(r)] for r in plan.train_rows]]
        xte = feats[[where[int(r)] for r in plan.test_rows]]
        clf = fit_linear(ev.classifier, xtr, labels[plan.train_rows], ev.svm_c, ev.seed)
        pred = clf.predict(xte)
        acc = float((pred == labels[plan.test_rows]).mean())
        accs.append(acc)
        cm_total += confusion(labels[plan.test_rows], pred, len(idx.classes))
        metrics[f"{plan.name}/acc"] = acc
        log({f"{plan.name}/acc": acc})
    metrics["acc"] = float(np.mean(accs))
    metrics["acc_std"] = float(np.std(accs))
    metrics["num_folds"] = float(len(plans))
    log({k: metrics[k] for k in ("acc", "acc_std", "num_folds", "feature_dim")})
    write_class_artifacts(
        out_dir,
        "folds",
        cm_total,
        idx.classes,
        f"{job} {ev.classifier} on {ev.feature_layer}: "
        f"{metrics['acc']:.3f} over {len(plans)} folds",
    )
    return metrics
