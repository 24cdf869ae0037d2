"""The video-only baseline's model (``train.objective=video_ssl``, CVRL): the same video net as
AVTS plus an MLP projection head; no audio net.

The video net is built by :func:`build_video_net` from the same ``model.*`` keys, under the same
attribute name (``.video``), so the exported ``video`` state dict has AVTS's layout and
``load_pretrained(..., part="video")`` and the evaluation jobs read it unchanged. The projection
(``heads["projection"]``, Linear-ReLU-Linear from the pooled features to ``model.embed_dim``,
hidden ``model.head_hidden_dim`` or the feature width) is used by the loss only, as in
SimCLR/CVRL. Pure ``torch.nn``.
"""

from __future__ import annotations

import torch
from torch import nn

from avts_dist.config import ModelConfig
from avts_dist.models.avts import EmbeddingHead
from avts_dist.models.backbones import build_video_net

__all__ = ["VideoSSLModel"]


class VideoSSLModel(nn.Module):
    """``forward(view1_BCTHW, view2_BCTHW) -> {"view1_emb", "view2_emb"}`` ([b, embed_dim],
    unnormalised: the loss normalises)."""

    objective = "video_ssl"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.video = build_video_net(cfg)
        self.heads = nn.ModuleDict(
            {
                "projection": EmbeddingHead(
                    self.video.feature_dim, cfg.embed_dim, cfg.head_hidden_dim
                )
            }
        )

    def encode_video(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        return self.heads["projection"](self.video.features(video_BCTHW, layer="pool"))

    def forward(
        self, view1_BCTHW: torch.Tensor, view2_BCTHW: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        if view1_BCTHW.shape != view2_BCTHW.shape:
            raise ValueError(
                f"the two views differ in shape: {list(view1_BCTHW.shape)} and "
                f"{list(view2_BCTHW.shape)}"
            )
        batch = view1_BCTHW.shape[0]
        # One pass over both views: one BatchNorm batch (as SimCLR/CVRL), one launch per layer.
        both = self.encode_video(torch.cat([view1_BCTHW, view2_BCTHW], dim=0))
        return {"view1_emb": both[:batch], "view2_emb": both[batch:]}
