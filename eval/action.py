"""Action recognition by fine-tuning the video subnetwork (UCF101, HMDB51, the synthetic labels).

Per split: fine-tune the pretrained video net with a new linear head, and
(``eval.finetune.scratch_baseline``) train the same architecture from random init with the same
recipe. Clip accuracy scores each test clip alone; video accuracy averages the softmax of
``eval.finetune.clips_per_video`` evenly spaced clips.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from avts_dist.config import DataConfig, FinetuneConfig
from avts_dist.data import DatasetIndex
from avts_dist.models import VideoClassifier
from eval.common import (
    EvalRuntime,
    JobIO,
    VideoClips,
    confusion,
    video_loader,
    write_class_artifacts,
)
from eval.pretrained import Pretrained
from eval.splits import SplitPlan

__all__ = [
    "FineTuneResult",
    "finetune_video",
    "run_finetune",
    "predict_videos",
    "train_classifier",
    "video_accuracy",
]


@dataclass
class FineTuneResult:
    acc_clip: float
    acc_video: float
    video_probs: np.ndarray  # [num_test_videos, num_classes]
    labels: np.ndarray
    final_loss: float


def video_accuracy(
    clip_probs_NC: np.ndarray, video_of_N: np.ndarray, labels_V: np.ndarray
) -> tuple[float, float, np.ndarray]:
    """``(clip accuracy, video accuracy, per-video mean probabilities)`` of test clips: clip
    ``i`` belongs to video ``video_of_N[i]``, whose label is ``labels_V[video]``."""
    clip_probs_NC = np.asarray(clip_probs_NC, dtype=np.float64)
    video_of_N = np.asarray(video_of_N, dtype=np.int64)
    num_videos, num_classes = len(labels_V), clip_probs_NC.shape[1]
    clip_acc = float((clip_probs_NC.argmax(1) == labels_V[video_of_N]).mean())
    sums = np.zeros((num_videos, num_classes))
    np.add.at(sums, video_of_N, clip_probs_NC)
    counts = np.bincount(video_of_N, minlength=num_videos)[:, None]
    video_probs = sums / np.maximum(counts, 1)
    return clip_acc, float((video_probs.argmax(1) == labels_V).mean()), video_probs


def _forward(model: torch.nn.Module, inputs, rt: EvalRuntime) -> torch.Tensor:
    """``model(video)``, or ``model(video, logmel)`` for clips read ``with_audio``."""
    if isinstance(inputs, (tuple, list)):
        return model(*(x.to(rt.device) for x in inputs))
    return model(inputs.to(rt.device))


def train_classifier(
    model: torch.nn.Module,
    batches: Iterable,
    *,
    lr: float,
    weight_decay: float,
    total_steps: int,
    rt: EvalRuntime,
    desc: str,
) -> float:
    """AdamW with a cosine schedule over ``total_steps`` on ``(video_BCTHW, label_B, _)`` (or
    ``((video_BCTHW, logmel_B1FT), label_B, _)``) batches, all parameters trained; returns the
    last batch's loss."""
    model.to(rt.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    bar = tqdm(total=total_steps, desc=f"{desc} train", disable=not rt.progress)
    loss_value = float("nan")
    for inputs, label_B, _ in batches:
        logits = _forward(model, inputs, rt)
        loss = F.cross_entropy(logits, label_B.to(rt.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_value = float(loss.detach())
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}")
    bar.close()
    return loss_value


@torch.no_grad()
def predict_videos(
    model: torch.nn.Module,
    idx: DatasetIndex,
    rows: np.ndarray,
    *,
    data: DataConfig,
    rt: EvalRuntime,
    clips_per_video: int,
    desc: str,
    with_audio: bool = False,
) -> tuple[float, float, np.ndarray, np.ndarray]:
    """``(clip acc, video acc, per-video probabilities, labels)`` of ``rows``: the softmax of
    ``clips_per_video`` evenly spaced clips per video, averaged."""
    model.eval()
    test_ds = VideoClips(
        idx,
        rows,
        data,
        train=False,
        clips_per_video=clips_per_video,
        seed=rt.seed,
        with_audio=with_audio,
    )
    probs, videos = [], []
    loader = video_loader(test_ds, rt.batch_size, False, rt.num_workers, rt.seed)
    for inputs, _, pos_B in tqdm(loader, desc=f"{desc} test", disable=not rt.progress):
        probs.append(F.softmax(_forward(model, inputs, rt).float(), dim=1).cpu().numpy())
        videos.append(pos_B.numpy())
    labels = idx.label[rows].astype(np.int64)
    acc_clip, acc_video, video_probs = video_accuracy(
        np.concatenate(probs), np.concatenate(videos), labels
    )
    return acc_clip, acc_video, video_probs, labels


def finetune_video(
    net: torch.nn.Module,
    idx: DatasetIndex,
    plan: SplitPlan,
    cfg: FinetuneConfig,
    *,
    data: DataConfig,
    rt: EvalRuntime,
    desc: str,
) -> FineTuneResult:
    model = VideoClassifier(net, len(idx.classes), dropout=cfg.dropout)
    train_ds = VideoClips(idx, plan.train_rows, data, train=True, seed=rt.seed)
    steps_per_epoch = -(-len(train_ds) // rt.batch_size)

    def epochs():
        for epoch in range(cfg.epochs):
            train_ds.epoch = epoch
            yield from video_loader(train_ds, rt.batch_size, True, rt.num_workers, rt.seed + epoch)

    loss_value = train_classifier(
        model,
        epochs(),
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        total_steps=cfg.epochs * steps_per_epoch,
        rt=rt,
        desc=desc,
    )
    acc_clip, acc_video, video_probs, labels = predict_videos(
        model,
        idx,
        plan.test_rows,
        data=data,
        rt=rt,
        clips_per_video=cfg.clips_per_video,
        desc=desc,
    )
    return FineTuneResult(acc_clip, acc_video, video_probs, labels, loss_value)


def run_finetune(
    cfg: FinetuneConfig, pre: Pretrained, plans: list[SplitPlan], io: JobIO
) -> dict[str, float]:
    """Fine-tune per split (+ scratch baseline); returns the metrics it logged."""
    idx, rt, log, title = io.idx, io.rt, io.log, io.title
    metrics: dict[str, float] = {}
    variants = [("pretrained", True)] + ([("scratch", False)] if cfg.scratch_baseline else [])
    for variant, pretrained in variants:
        clip_accs, video_accs = [], []
        for plan in plans:
            torch.manual_seed(rt.seed)
            net = pre.video_net(pretrained=pretrained, seed=rt.seed)
            res = finetune_video(
                net, idx, plan, cfg, data=io.data, rt=rt, desc=f"{title} {variant} {plan.name}"
            )
            m = {
                f"{variant}/{plan.name}/acc_clip": res.acc_clip,
                f"{variant}/{plan.name}/acc_video": res.acc_video,
                f"{variant}/{plan.name}/final_train_loss": res.final_loss,
            }
            log(m)
            metrics.update(m)
            clip_accs.append(res.acc_clip)
            video_accs.append(res.acc_video)
            cm = confusion(res.labels, res.video_probs.argmax(1), len(idx.classes))
            write_class_artifacts(
                io.out_dir,
                f"{variant}_{plan.name}",
                cm,
                idx.classes,
                f"{title} {variant} {plan.name}: video acc {res.acc_video:.3f}",
            )
        mean = {
            f"{variant}/acc_clip_mean": float(np.mean(clip_accs)),
            f"{variant}/acc_video_mean": float(np.mean(video_accs)),
        }
        log(mean)
        metrics.update(mean)
    # Headline names (the pretrained net) for comparison tables.
    metrics["acc_video"] = metrics["pretrained/acc_video_mean"]
    metrics["acc_clip"] = metrics["pretrained/acc_clip_mean"]
    if cfg.scratch_baseline:
        metrics["gain_over_scratch"] = metrics["acc_video"] - metrics["scratch/acc_video_mean"]
    log({k: metrics[k] for k in ("acc_video", "acc_clip", "gain_over_scratch") if k in metrics})
    return metrics
