"""``model``: the two-stream (or early-fusion) network's architecture."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from avts_dist.config.common import check_choices, fail

__all__ = ["ModelConfig"]


@dataclass
class ModelConfig:
    # two_stream (AVTS: separate video and audio nets, usable alone) | early_fusion (one
    # audio-visual net: audio joins the video stream after video stage `fusion_stage`).
    arch: Literal["two_stream", "early_fusion"] = "two_stream"
    # torchvision-compatible video nets; widths/depths shrink them for CPU.
    video_arch: Literal["r2plus1d_18", "mc3_18", "r3d_18"] = "r2plus1d_18"
    video_width: int = 64
    video_layers: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    # vgg: AVTS-like, full size; tiny: for CPU tests.
    audio_arch: Literal["vgg", "tiny"] = "vgg"
    audio_width: int = 64
    embed_dim: int = 128
    # Hidden width of the embedding / fusion MLPs; 0 means the input width.
    head_hidden_dim: int = 0
    # Time bins the embedding heads see: 1 pools each stream globally (AVTS); N > 1 pools the
    # last stage over space (video) or frequency (audio) only, then over time into N bins, so the
    # embedding keeps *when* events happen inside a clip (what hard negatives test).
    temporal_bins: int = 1
    fusion_head: bool = False
    # early_fusion: the video stage (1-3) after which audio features are added; the audio net
    # runs as many stages first, the video net's later stages are shared.
    fusion_stage: int = 1
    activation_checkpointing: bool = False
    channels_last_3d: bool = False
    # A torchvision-layout video state dict (local path or fsspec URL) the video net starts from,
    # e.g. torchvision's Kinetics-400 weights saved with torch.save; "" starts from scratch.
    init_from: str = ""

    def __post_init__(self) -> None:
        check_choices(self, "model")
        if self.fusion_stage not in (1, 2, 3):
            fail("model.fusion_stage", f"must be 1, 2 or 3, got {self.fusion_stage}")
        if self.arch == "early_fusion" and self.init_from:
            fail(
                "model.init_from", "torchvision weights fit model.arch=two_stream's video net only"
            )
        if len(self.video_layers) != 4 or any(n < 1 for n in self.video_layers):
            fail("model.video_layers", "must be four stage depths, each >= 1")
        for name in ("video_width", "audio_width", "embed_dim"):
            if getattr(self, name) <= 0:
                fail(f"model.{name}", "must be > 0")
        if self.head_hidden_dim < 0:
            fail("model.head_hidden_dim", "must be >= 0 (0 = input width)")
        if self.temporal_bins < 1:
            fail("model.temporal_bins", "must be >= 1 (1 = global pooling)")
