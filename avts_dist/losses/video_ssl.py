"""The video-only baseline's loss (``train.objective=video_ssl``): CVRL's InfoNCE over two views.

CVRL (Qian et al., "Spatiotemporal Contrastive Video Representation Learning", CVPR 2021), the
SimCLR form: each video of the global batch ``B`` gives two views (two windows with independent
augmentation), ``2B`` projected embeddings in all. Each embedding is an anchor; its positive is
the other view of the same video, its negatives the ``2B - 2`` views of the other videos;
cosine similarity over ``temperature`` (``loss.video_ssl_temperature``, 0.1 as in CVRL), cross
entropy over the ``2B - 1`` candidates.

Normalisation, as the AVTS losses (why N ranks equal one process): a rank holds the two views of
``b = B / N`` videos; its loss is the sum over its ``2b`` anchors divided by ``2b``. Every
rank's views reach every other rank through the exact gather (``all_gather_with_grad``), so the
gradient of a view sums the terms of every anchor that sees it; DeepSpeed's gradient average
(sum / N) then gives the gradient of the global mean over ``2B`` anchors. The logged loss is the
mean of the per-rank means (:func:`avts_dist.losses.reduce_metrics`), the global mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from avts_dist.config import LossConfig
from avts_dist.distributed.collectives import GatherGroups
from avts_dist.losses.avts import gather_global_batch

__all__ = ["VideoSSLInfoNCELoss"]


class VideoSSLInfoNCELoss(nn.Module):
    """``loss_fn(view1_emb, view2_emb, rank=, world_size=) -> dict`` with ``"loss"`` (this
    rank's mean over its anchors, to backpropagate) and detached metrics: ``acc/view`` (the
    other view ranks first among the global batch's ``2B - 1`` candidates), ``num/view``."""

    def __init__(self, cfg: LossConfig, gather_groups: GatherGroups | None = None) -> None:
        super().__init__()
        self.temperature = cfg.video_ssl_temperature
        self.gather_with_grad = cfg.gather_with_grad
        self.gather_groups = gather_groups

    def forward(
        self,
        view1_emb: torch.Tensor,
        view2_emb: torch.Tensor,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> dict[str, torch.Tensor]:
        if view1_emb.ndim != 2 or view1_emb.shape != view2_emb.shape:
            raise ValueError(
                f"view1_emb and view2_emb must both be [b, D], got {tuple(view1_emb.shape)} and "
                f"{tuple(view2_emb.shape)}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        b = view1_emb.shape[0]
        # fp32 and normalised after the gather: the backward sums gradients in fp32.
        gather = dict(world_size=world_size, with_grad=self.gather_with_grad)
        gather["groups"] = self.gather_groups
        z1_BD = F.normalize(gather_global_batch(view1_emb.float(), **gather), dim=1)
        z2_BD = F.normalize(gather_global_batch(view2_emb.float(), **gather), dim=1)
        num_global = z1_BD.shape[0]
        z_2BD = torch.cat([z1_BD, z2_BD])
        own = torch.arange(rank * b, (rank + 1) * b, device=z_2BD.device)
        anchors = torch.cat([own, own + num_global])  # this rank's rows of z_2BD
        targets = torch.cat([own + num_global, own])  # each anchor's other view
        logits = z_2BD[anchors] @ z_2BD.T / self.temperature  # [2b, 2B]
        # An anchor is not its own candidate.
        logits = logits.masked_fill(F.one_hot(anchors, 2 * num_global).bool(), float("-inf"))
        loss = F.cross_entropy(logits, targets, reduction="sum") / (2 * b)
        hits = (logits.detach().argmax(dim=1) == targets).float()
        return {
            "loss": loss,
            "loss/view_infonce": loss.detach(),
            "acc/view": hits.mean(),
            "num/view": torch.tensor(float(2 * b), device=hits.device),
        }
