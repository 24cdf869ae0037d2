"""avts_dist.losses: AVTS losses with cross-rank negatives.

``build_loss(cfg.loss)`` returns an ``nn.Module`` called as
``loss_fn(video_emb, audio_emb, neg_audio_emb, neg_kind, rank=, world_size=, weights=None,
sync_logit=None, neg_sync_logit=None, step=None) -> dict[str, Tensor]`` with ``"loss"`` (the
tensor to backpropagate: this rank's local mean) plus detached terms and metrics; turn those into
global-batch floats with :func:`reduce_metrics` at log steps.
"""

from __future__ import annotations

from torch import nn

from avts_dist.config import LossConfig
from avts_dist.losses.avts import AVTSContrastiveLoss, AVTSInfoNCELoss, reduce_metrics

__all__ = ["AVTSContrastiveLoss", "AVTSInfoNCELoss", "build_loss", "reduce_metrics"]


def build_loss(cfg: LossConfig) -> nn.Module:
    if cfg.kind == "contrastive":
        return AVTSContrastiveLoss(cfg)
    if cfg.kind == "infonce":
        return AVTSInfoNCELoss(cfg)
    raise ValueError(f"config key 'loss.kind': unknown loss {cfg.kind!r}")
