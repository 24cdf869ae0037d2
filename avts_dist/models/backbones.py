"""The two subnetworks of ``cfg.model``: the video net and the audio net, each headless.

Every model (``registry.py``) and every pretrained part (``avts_dist.export``) builds its
backbones here, so one ``model.*`` config gives one architecture everywhere. Pure ``torch.nn``.
"""

from __future__ import annotations

from avts_dist.config import ModelConfig
from avts_dist.models.audio import AudioVGG
from avts_dist.models.video import VideoResNet

__all__ = ["build_audio_net", "build_video_net"]


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
