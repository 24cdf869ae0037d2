"""The two-stream AVTS model, its builders and the single-stream classification heads.

``AVTSModel`` = video subnetwork + audio subnetwork + per-stream embedding heads (MLP to
``embed_dim``) + an optional fusion head that scores a (video, audio) pair as in sync.
Each stream stays usable alone (``model.video``, ``model.audio``), which is what the exported
weights hold. Pure ``torch.nn``: the distributed context reaches the loss, never the model.
"""

from __future__ import annotations

import torch
from torch import nn

from avts_dist.config import ModelConfig
from avts_dist.models.audio import AudioVGG
from avts_dist.models.init_from import init_video_from
from avts_dist.models.video import VideoResNet

__all__ = [
    "AVTSModel",
    "AudioClassifier",
    "EmbeddingHead",
    "FusionHead",
    "StreamClassifier",
    "VideoClassifier",
    "build_audio_net",
    "build_model",
    "build_video_net",
]


def build_video_net(cfg: ModelConfig, num_classes: int = 0) -> VideoResNet:
    """The video backbone of ``cfg`` (headless unless ``num_classes``)."""
    return VideoResNet(
        arch=cfg.video_arch,
        layers=cfg.video_layers,
        width=cfg.video_width,
        num_classes=num_classes,
        activation_checkpointing=cfg.activation_checkpointing,
        channels_last_3d=cfg.channels_last_3d,
    )


def build_audio_net(cfg: ModelConfig) -> AudioVGG:
    return AudioVGG(
        arch=cfg.audio_arch,
        width=cfg.audio_width,
        activation_checkpointing=cfg.activation_checkpointing,
    )


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


def build_model(cfg: ModelConfig, objective: str = "avts") -> nn.Module:
    """``AVTSModel`` (``model.arch=two_stream``, its video net fresh or from ``cfg.init_from``),
    ``EarlyFusionModel`` (``early_fusion``), or with ``objective="video_ssl"``
    (``train.objective``) the video-only ``VideoSSLModel``."""
    if cfg.arch == "early_fusion":
        from avts_dist.models.early_fusion import EarlyFusionModel  # it imports this module

        return EarlyFusionModel(cfg)
    if objective == "video_ssl":
        from avts_dist.models.video_ssl import VideoSSLModel  # it imports this module

        model = VideoSSLModel(cfg)
    else:
        model = AVTSModel(cfg)
    if cfg.init_from:
        init_video_from(model.video, cfg.init_from)
    return model


class StreamClassifier(nn.Module):
    """backbone features (``layer``, pooled) -> dropout -> linear, optionally a frozen backbone.

    A frozen backbone gets no gradients and stays in eval mode (its BN statistics are kept),
    which is the linear-probe protocol; unfrozen, it is fine-tuning.
    """

    def __init__(
        self,
        backbone: VideoResNet | AudioVGG,
        num_classes: int,
        dropout: float = 0.5,
        freeze_backbone: bool = False,
        layer: str = "pool",
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if layer not in backbone.stage_names:
            raise ValueError(f"unknown layer {layer!r}; expected one of {backbone.stage_names}")
        self.backbone = backbone
        self.layer = layer
        self.freeze_backbone = freeze_backbone
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(backbone.feature_dim_of(layer), num_classes)
        if freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> StreamClassifier:
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.freeze_backbone:
            with torch.no_grad():
                feats = self.backbone.features(x, layer=self.layer, pooled=True)
        else:
            feats = self.backbone.features(x, layer=self.layer, pooled=True)
        return self.fc(self.dropout(feats))


class VideoClassifier(StreamClassifier):
    """Fine-tuning / linear-probe head on a video backbone (input ``video_BCTHW``)."""

    @classmethod
    def from_export(
        cls, path: str, num_classes: int, storage_options: dict | None = None, **kwargs
    ) -> VideoClassifier:
        """Pretrained video backbone from an ``avts export`` file plus a fresh head."""
        from avts_dist.models.export import build_video_net_from_export  # export imports us

        return cls(build_video_net_from_export(path, storage_options), num_classes, **kwargs)


class AudioClassifier(StreamClassifier):
    """Linear-probe / fine-tuning head on an audio backbone (input ``logmel_B1FT``)."""

    @classmethod
    def from_export(
        cls, path: str, num_classes: int, storage_options: dict | None = None, **kwargs
    ) -> AudioClassifier:
        """Pretrained audio backbone from an ``avts export`` file plus a fresh head."""
        from avts_dist.models.export import build_audio_net_from_export  # export imports us

        return cls(build_audio_net_from_export(path, storage_options), num_classes, **kwargs)


class ConcatClassifier(nn.Module):
    """Both subnetworks' pooled features, concatenated -> dropout -> linear: the two-stream
    model's multimodal classifier (``(video, log-mel) -> class logits``), both nets trained."""

    def __init__(
        self, video: VideoResNet, audio: AudioVGG, num_classes: int, dropout: float = 0.5
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.video, self.audio = video, audio
        self.dropout = nn.Dropout(dropout)
        dim = video.feature_dim_of("pool") + audio.feature_dim_of("pool")
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, video_BCTHW: torch.Tensor, logmel_B1FT: torch.Tensor) -> torch.Tensor:
        feats = torch.cat(
            [
                self.video.features(video_BCTHW, layer="pool", pooled=True),
                self.audio.features(logmel_B1FT, layer="pool", pooled=True),
            ],
            dim=1,
        )
        return self.fc(self.dropout(feats))
