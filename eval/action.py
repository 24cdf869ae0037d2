"""Action recognition by fine-tuning the video subnetwork (UCF101, HMDB51, the synthetic labels).

Per split: fine-tune the pretrained video net with a new linear head, and (``eval.scratch_baseline``)
train the same architecture from random init with the same recipe. Clip accuracy scores each test
clip alone; video accuracy averages the softmax of ``eval.clips_per_video`` evenly spaced clips.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from eval.common import (
    SplitPlan,
    VideoClips,
    confusion,
    pick_device,
    split_plans,
    video_loader,
    write_class_artifacts,
)

__all__ = ["FineTuneResult", "finetune_video", "run_action"]


@dataclass
class FineTuneResult:
    acc_clip: float
    acc_video: float
    video_probs: np.ndarray  # [num_test_videos, num_classes]
    labels: np.ndarray
    final_loss: float


def finetune_video(net, idx, plan: SplitPlan, cfg, *, device, desc: str) -> FineTuneResult:
    from tqdm.auto import tqdm

    from avts_dist.models import VideoClassifier

    ev, data = cfg.eval, cfg.data
    num_classes = len(idx.classes)
    model = VideoClassifier(net, num_classes, dropout=0.5).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=ev.lr, weight_decay=ev.weight_decay)
    train_ds = VideoClips(idx, plan.train_rows, data, train=True, seed=ev.seed)
    steps_per_epoch = -(-len(train_ds) // ev.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=ev.epochs * steps_per_epoch)
    bar = tqdm(total=ev.epochs * steps_per_epoch, desc=f"{desc} train", disable=not ev.progress)
    loss_value = float("nan")
    for epoch in range(ev.epochs):
        train_ds.epoch = epoch
        model.train()
        loader = video_loader(train_ds, ev.batch_size, True, ev.num_workers, ev.seed + epoch)
        for video_BCTHW, label_B, _ in loader:
            logits = model(video_BCTHW.to(device))
            loss = F.cross_entropy(logits, label_B.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_value = float(loss.detach())
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}")
    bar.close()

    model.eval()
    test_ds = VideoClips(
        idx, plan.test_rows, data, train=False, clips_per_video=ev.clips_per_video, seed=ev.seed
    )
    probs = np.zeros((len(plan.test_rows), num_classes), dtype=np.float64)
    clip_correct = 0
    loader = video_loader(test_ds, ev.batch_size, False, ev.num_workers, ev.seed)
    with torch.no_grad():
        for video_BCTHW, label_B, pos_B in tqdm(
            loader, desc=f"{desc} test", disable=not ev.progress
        ):
            p = F.softmax(model(video_BCTHW.to(device)).float(), dim=1).cpu()
            clip_correct += int((p.argmax(1) == label_B).sum())
            np.add.at(probs, pos_B.numpy(), p.numpy())
    labels = idx.label[plan.test_rows].astype(np.int64)
    return FineTuneResult(
        acc_clip=clip_correct / max(1, len(test_ds)),
        acc_video=float((probs.argmax(1) == labels).mean()),
        video_probs=probs / ev.clips_per_video,
        labels=labels,
        final_loss=loss_value,
    )


def run_action(job: str, cfg, pre, idx, out_dir: Path, log) -> dict[str, float]:
    """Fine-tune per split (+ scratch baseline); returns the metrics it logged."""
    device = pick_device(cfg.eval.device)
    ev = cfg.eval
    plans = split_plans(idx, ev, usable=idx.has_video.astype(bool))
    metrics: dict[str, float] = {}
    variants = [("pretrained", True)] + ([("scratch", False)] if ev.scratch_baseline else [])
    for variant, pretrained in variants:
        clip_accs, video_accs = [], []
        for plan in plans:
            torch.manual_seed(ev.seed)
            net = pre.video_net(pretrained=pretrained, seed=ev.seed)
            res = finetune_video(
                net, idx, plan, cfg, device=device, desc=f"{job} {variant} {plan.name}"
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
                out_dir,
                f"{variant}_{plan.name}",
                cm,
                idx.classes,
                f"{job} {variant} {plan.name}: video acc {res.acc_video:.3f}",
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
    if ev.scratch_baseline:
        metrics["gain_over_scratch"] = metrics["acc_video"] - metrics["scratch/acc_video_mean"]
    log({k: metrics[k] for k in ("acc_video", "acc_clip", "gain_over_scratch") if k in metrics})
    return metrics
