"""Audio-visual action recognition by late fusion.

Per split: the pretrained video net is fine-tuned (as in :mod:`eval.action`) and a logistic
regression is trained on frozen audio features of the training clips that have audio. At test
time the class probabilities are averaged for clips with audio; clips without an audio track use
the video probabilities alone, and are counted (``num_test_without_audio``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from eval.action import finetune_video
from eval.common import (
    audio_features,
    confusion,
    fit_linear,
    pick_device,
    split_plans,
    write_class_artifacts,
)

__all__ = ["run_multimodal"]


def run_multimodal(job: str, cfg, pre, idx, out_dir: Path, log) -> dict[str, float]:
    ev = cfg.eval
    device = pick_device(ev.device)
    plans = split_plans(idx, ev, usable=idx.has_video.astype(bool))
    has_audio = idx.has_audio.astype(bool)
    labels = idx.label.astype(np.int64)
    num_classes = len(idx.classes)
    audio_net = pre.audio_net()
    results = {"video": [], "audio": [], "fused": []}
    metrics: dict[str, float] = {}
    cm_total = np.zeros((num_classes, num_classes), dtype=np.int64)
    for plan in plans:
        video = finetune_video(
            pre.video_net(seed=ev.seed), idx, plan, cfg, device=device, desc=f"{job} {plan.name}"
        )
        probs = video.video_probs.copy()
        tr_a = plan.train_rows[has_audio[plan.train_rows]]
        te_mask = has_audio[plan.test_rows]
        audio_acc = float("nan")
        if tr_a.size and te_mask.any() and len(set(labels[tr_a].tolist())) > 1:
            rows = np.unique(np.r_[tr_a, plan.test_rows[te_mask]])
            feats = audio_features(
                audio_net,
                idx,
                rows,
                cfg.data,
                layer=ev.feature_layer,
                num_windows=ev.audio_windows,
                batch_size=ev.batch_size,
                device=device,
                progress=ev.progress,
                desc=f"{job} audio",
            )
            where = {int(r): i for i, r in enumerate(rows)}
            clf = fit_linear(
                "logreg", feats[[where[int(r)] for r in tr_a]], labels[tr_a], ev.svm_c, ev.seed
            )
            te_rows = plan.test_rows[te_mask]
            p_audio = np.zeros((te_rows.size, num_classes))
            p_audio[:, clf.classes_] = clf.predict_proba(feats[[where[int(r)] for r in te_rows]])
            audio_acc = float((p_audio.argmax(1) == labels[te_rows]).mean())
            probs[te_mask] = 0.5 * (probs[te_mask] + p_audio)
        fused_acc = float((probs.argmax(1) == video.labels).mean())
        m = {
            f"{plan.name}/acc_video_only": video.acc_video,
            f"{plan.name}/acc_audio_only": audio_acc,
            f"{plan.name}/acc_fused": fused_acc,
            f"{plan.name}/num_test_without_audio": float((~te_mask).sum()),
            f"{plan.name}/num_train_without_audio": float((~has_audio[plan.train_rows]).sum()),
        }
        log(m)
        metrics.update(m)
        results["video"].append(video.acc_video)
        results["audio"].append(audio_acc)
        results["fused"].append(fused_acc)
        cm_total += confusion(video.labels, probs.argmax(1), num_classes)
    metrics.update(
        {
            "acc": float(np.mean(results["fused"])),
            "acc_video_only": float(np.mean(results["video"])),
            "acc_audio_only": float(np.nanmean(results["audio"]))
            if not all(np.isnan(results["audio"]))
            else float("nan"),
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
        out_dir, "fused", cm_total, idx.classes, f"{job} late fusion: {metrics['acc']:.3f}"
    )
    return metrics
