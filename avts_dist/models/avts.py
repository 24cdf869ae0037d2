"""The two-stream AVTS model: two subnetworks, their embedding heads and the fusion head.

``AVTSModel`` = video subnetwork + audio subnetwork + per-stream embedding heads (MLP to
``embed_dim``) + an optional fusion head that scores a (video, audio) pair as in sync.
Each stream stays usable alone (``model.video``, ``model.audio``), which is what the exported
weights hold. Pure ``torch.nn``: the distributed context reaches the loss, never the model.
"""

from __future__ import annotations

import torch
from torch import nn

from avts_dist.config import ModelConfig
from avts_dist.models.backbones import build_audio_net, build_video_net

__all__ = ["AVTSModel", "EmbeddingHead", "FusionHead"]


class EmbeddingHead(nn.Sequential):
    """Linear-ReLU-Linear from backbone features to the shared embedding space."""

    def __init__(self, in_dim: int, embed_dim: int, hidden_dim: int = 0) -> None:
        hidden = hidden_dim or in_dim
        super().__init__(
            nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, embed_dim)
        )


class FusionHead(nn.Module):
    """Sync logit of a pair from [v, a, |v - a|] (> 0 means "in sync")."""

    def __init__(self, embed_dim: int, hidden_dim: int = 0) -> None:
        super().__init__()
        hidden = hidden_dim or embed_dim
        self.mlp = nn.Sequential(
            nn.Linear(3 * embed_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1)
        )

    def forward(self, video_emb_BD: torch.Tensor, audio_emb_BD: torch.Tensor) -> torch.Tensor:
        pair = torch.cat([video_emb_BD, audio_emb_BD, (video_emb_BD - audio_emb_BD).abs()], dim=1)
        return self.mlp(pair).squeeze(1)


class AVTSModel(nn.Module):
    """Video and audio streams with embedding heads; see :meth:`forward` for the contract."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.video = build_video_net(cfg)
        self.audio = build_audio_net(cfg)
        bins = cfg.temporal_bins
        heads: dict[str, nn.Module] = {
            "video": EmbeddingHead(
                bins * self.video.feature_dim, cfg.embed_dim, cfg.head_hidden_dim
            ),
            "audio": EmbeddingHead(
                bins * self.audio.feature_dim, cfg.embed_dim, cfg.head_hidden_dim
            ),
        }
        if cfg.fusion_head:
            heads["fusion"] = FusionHead(cfg.embed_dim, cfg.head_hidden_dim)
        # Under one ModuleDict so the export holds them as one "heads" state_dict.
        self.heads = nn.ModuleDict(heads)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def encode_video(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        if self.config.temporal_bins == 1:
            return self.heads["video"](self.video.features(video_BCTHW, layer="pool"))
        feats_BCTHW = self.video.features(video_BCTHW, layer="layer4", pooled=False)
        return self.heads["video"](
            _time_bins(feats_BCTHW.mean(dim=(3, 4)), self.config.temporal_bins)
        )

    def encode_audio(self, logmel_B1FT: torch.Tensor) -> torch.Tensor:
        if self.config.temporal_bins == 1:
            return self.heads["audio"](self.audio.features(logmel_B1FT, layer="pool"))
        feats_BCFT = self.audio.features(logmel_B1FT, layer="layer4", pooled=False)
        return self.heads["audio"](_time_bins(feats_BCFT.mean(dim=2), self.config.temporal_bins))

    def forward(
        self,
        video_BCTHW: torch.Tensor,
        logmel_B1FT: torch.Tensor,
        neg_logmel_B1FT: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Embeddings [B, embed_dim], unnormalised (the loss normalises if configured).

        Returns ``video_emb``, ``audio_emb``, ``neg_audio_emb`` (None without negatives) and,
        with the fusion head, ``sync_logit`` [B] (and ``neg_sync_logit`` [B] with negatives).
        """
        batch = video_BCTHW.shape[0]
        if logmel_B1FT.shape[0] != batch:
            raise ValueError(f"video batch {batch} != audio batch {logmel_B1FT.shape[0]}")
        video_emb = self.encode_video(video_BCTHW)
        if neg_logmel_B1FT is not None:
            if neg_logmel_B1FT.shape != logmel_B1FT.shape:
                raise ValueError(
                    f"negative audio shape {list(neg_logmel_B1FT.shape)} != "
                    f"audio shape {list(logmel_B1FT.shape)}"
                )
            # One pass over positives and negatives: one BN batch, one kernel launch per layer.
            both = self.encode_audio(torch.cat([logmel_B1FT, neg_logmel_B1FT], dim=0))
            audio_emb, neg_audio_emb = both[:batch], both[batch:]
        else:
            audio_emb, neg_audio_emb = self.encode_audio(logmel_B1FT), None
        out: dict[str, torch.Tensor | None] = {
            "video_emb": video_emb,
            "audio_emb": audio_emb,
            "neg_audio_emb": neg_audio_emb,
        }
        if "fusion" in self.heads:
            out["sync_logit"] = self.heads["fusion"](video_emb, audio_emb)
            if neg_audio_emb is not None:
                out["neg_sync_logit"] = self.heads["fusion"](video_emb, neg_audio_emb)
        return out


def _time_bins(feats_BCT: torch.Tensor, num_bins: int) -> torch.Tensor:
    """[B, C, T] -> [B, C * num_bins]: average over time within each of ``num_bins`` bins."""
    return nn.functional.adaptive_avg_pool1d(feats_BCT, num_bins).flatten(1)
