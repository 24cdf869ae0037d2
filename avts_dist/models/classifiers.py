"""Classifiers on the pretrained subnetworks: the downstream evaluations' models.

``VideoClassifier`` / ``AudioClassifier``: one subnetwork with a linear head, its backbone frozen
(linear probe) or trained (fine-tuning); ``ConcatClassifier``: both subnetworks, their pooled
features concatenated (multimodal). A pretrained backbone comes from
``avts_dist.export.load_pretrained``. Pure ``torch.nn``.
"""

from __future__ import annotations

import torch
from torch import nn

from avts_dist.models.audio import AudioVGG
from avts_dist.models.video import VideoResNet

__all__ = ["AudioClassifier", "ConcatClassifier", "StreamClassifier", "VideoClassifier"]


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


class AudioClassifier(StreamClassifier):
    """Linear-probe / fine-tuning head on an audio backbone (input ``logmel_B1FT``)."""


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
