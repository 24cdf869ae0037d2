"""avts_dist.losses: AVTS losses with cross-rank negatives.

``build_loss(cfg.loss)`` returns an ``nn.Module`` called as
``loss_fn(video_emb, audio_emb, neg_audio_emb, neg_kind, rank=, world_size=, weights=None,
sync_logit=None, neg_sync_logit=None, step=None) -> dict[str, Tensor]`` with ``"loss"`` (the
tensor to backpropagate: this rank's local mean) plus detached terms and metrics; turn those into
global-batch floats with :func:`reduce_metrics` at log steps.

``build_loss(cfg.loss, objective="video_ssl")`` returns the video-only baseline's two-view
InfoNCE instead, called as ``loss_fn(view1_emb, view2_emb, rank=, world_size=)``
(:mod:`avts_dist.losses.video_ssl`).

``gather_groups`` (from ``collectives.gather_groups(cfg.loss.gather, ctx)``) makes either loss
gather within each node, then across nodes; None gathers flat.
"""

from __future__ import annotations

from torch import nn

from avts_dist.config import LossConfig
from avts_dist.distributed.collectives import GatherGroups
from avts_dist.losses.avts import AVTSContrastiveLoss, AVTSInfoNCELoss, reduce_metrics
from avts_dist.losses.video_ssl import VideoSSLInfoNCELoss

__all__ = [
    "AVTSContrastiveLoss",
    "AVTSInfoNCELoss",
    "VideoSSLInfoNCELoss",
    "build_loss",
    "reduce_metrics",
]


def build_loss(
    cfg: LossConfig, objective: str = "avts", gather_groups: GatherGroups | None = None
) -> nn.Module:
    """The loss of ``train.objective``: AVTS (``loss.kind``) or the video-only InfoNCE."""
    if objective == "video_ssl":
        return VideoSSLInfoNCELoss(cfg, gather_groups)
    if cfg.kind == "contrastive":
        return AVTSContrastiveLoss(cfg, gather_groups)
    if cfg.kind == "infonce":
        return AVTSInfoNCELoss(cfg, gather_groups)
    raise ValueError(f"config key 'loss.kind': unknown loss {cfg.kind!r}")
