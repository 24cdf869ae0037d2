"""Audio-visual action recognition by late fusion.

Per split: the pretrained video net is fine-tuned (as in :mod:`eval.action`) and a logistic
regression is trained on frozen audio features of the training clips that have audio. At test
time the class probabilities are averaged for clips with audio; clips without an audio track use
the video probabilities alone, and are counted (``num_test_without_audio``).
"""

from __future__ import annotations

import numpy as np
import torch

from avts_dist.config import FinetuneConfig, LinearProbeConfig
from eval.action import finetune_video
from eval.audio import check_feature_layer
from eval.common import (
    JobIO,
    audio_features,
    confusion,
    fit_linear,
    write_class_artifacts,
)
from eval.pretrained import Pretrained
from eval.splits import SplitPlan

__all__ = ["late_fusion", "run_multimodal"]


def late_fusion(
    video_probs_NC: np.ndarray, audio_probs_MC: np.ndarray, has_audio_N: np.ndarray
) -> np.ndarray:
    """Mean of video and audio probabilities where the clip has audio (``audio_probs_MC`` holds
    those clips' rows, in order); video alone elsewhere."""
    fused = np.array(video_probs_NC, dtype=np.float64, copy=True)
    fused[has_audio_N] = 0.5 * (fused[has_audio_N] + audio_probs_MC)
    return fused


def _audio_probs(
    probe: LinearProbeConfig, net: torch.nn.Module, plan: SplitPlan, io: JobIO
) -> np.ndarray | None:
    """Class probabilities of the test clips with audio, or None when no classifier can train."""
    idx = io.idx
    has_audio = idx.has_audio.astype(bool)
    labels = idx.label.astype(np.int64)
    train = plan.train_rows[has_audio[plan.train_rows]]
    test = plan.test_rows[has_audio[plan.test_rows]]
    if not train.size or not test.size or len(set(labels[train].tolist())) < 2:
        return None
    rows = np.unique(np.r_[train, test])
    feats, _ = audio_features(
        net,
        idx,
        rows,
        io.data,
        layer=probe.feature_layer,
        num_windows=probe.windows,
        rt=io.rt,
        desc=f"{io.title} audio",
    )
    where = {int(r): i for i, r in enumerate(rows)}
    # Late fusion needs class probabilities: logistic regression, whatever eval.probe.classifier.
    clf = fit_linear(
        "logreg", feats[[where[int(r)] for r in train]], labels[train], probe.c, io.rt.seed
    )
    probs = np.zeros((test.size, len(idx.classes)))
    probs[:, clf.classes_] = clf.predict_proba(feats[[where[int(r)] for r in test]])
    return probs


def run_multimodal(
    finetune: FinetuneConfig,
    probe: LinearProbeConfig,
    pre: Pretrained,
    plans: list[SplitPlan],
    io: JobIO,
) -> dict[str, float]:
    idx, rt, log, title = io.idx, io.rt, io.log, io.title
    has_audio = idx.has_audio.astype(bool)
    labels = idx.label.astype(np.int64)
    num_classes = len(idx.classes)
    audio_net = pre.audio_net()
    check_feature_layer(audio_net, probe.feature_layer)
    results: dict[str, list[float]] = {"video": [], "audio": [], "fused": []}
    metrics: dict[str, float] = {}
    cm_total = np.zeros((num_classes, num_classes), dtype=np.int64)
    for plan in plans:
        video = finetune_video(
            pre.video_net(seed=rt.seed),
            idx,
            plan,
            finetune,
            data=io.data,
            rt=rt,
            desc=f"{title} {plan.name}",
        )
        test_has_audio = has_audio[plan.test_rows]
        audio_probs = _audio_probs(probe, audio_net, plan, io)
        probs = video.video_probs
        audio_acc = float("nan")
        if audio_probs is not None:
            audio_acc = float(
                (audio_probs.argmax(1) == labels[plan.test_rows[test_has_audio]]).mean()
            )
            probs = late_fusion(probs, audio_probs, test_has_audio)
        fused_acc = float((probs.argmax(1) == video.labels).mean())
        m = {
            f"{plan.name}/acc_video_only": video.acc_video,
            f"{plan.name}/acc_audio_only": audio_acc,
            f"{plan.name}/acc_fused": fused_acc,
            f"{plan.name}/num_test_without_audio": float((~test_has_audio).sum()),
            f"{plan.name}/num_train_without_audio": float((~has_audio[plan.train_rows]).sum()),
        }
        log(m)
        metrics.update(m)
        results["video"].append(video.acc_video)
        results["audio"].append(audio_acc)
        results["fused"].append(fused_acc)
        cm_total += confusion(video.labels, probs.argmax(1), num_classes)
    audio_accs = [a for a in results["audio"] if not np.isnan(a)]
    metrics.update(
        {
            "acc": float(np.mean(results["fused"])),
            "acc_video_only": float(np.mean(results["video"])),
            "acc_audio_only": float(np.mean(audio_accs)) if audio_accs else float("nan"),
            "num_test_without_audio": float(
                sum(metrics[f"{p.name}/num_test_without_audio"] for p in plans)
            ),
        }
    )
    log(
        {
            k: metrics[k]
            for k in ("acc", "acc_video_only", "acc_audio_only", "num_test_without_audio")
        }
    )
    write_class_artifacts(
        io.out_dir, "fused", cm_total, idx.classes, f"{title} late fusion: {metrics['acc']:.3f}"
    )
    return metrics
