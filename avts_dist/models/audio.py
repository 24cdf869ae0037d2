"""Audio subnetwork: a VGG-like 2D conv net on log-mel spectrograms, as in AVTS.

Input ``logmel_B1FT`` (one channel, F mel bins, T frames). Four stages of conv3x3-BN-ReLU blocks;
stages 1-3 end in a 2x2 max-pool (ceil mode, so short inputs never pool to zero), then a global
average pool gives ``feature_dim = 8 * width`` features. ``vgg`` (two convs per stage, width 64:
4.7 M parameters) is the full-size net; ``tiny`` (one conv per stage) is the CPU variant.
Architecture only: no distributed code here.
"""

from __future__ import annotations

import torch
from torch import nn

from avts_dist.models.video import checkpoint_stage

__all__ = ["AUDIO_ARCHS", "AudioVGG", "audio_vgg"]

# arch -> convs per stage
AUDIO_ARCHS: dict[str, tuple[int, int, int, int]] = {
    "vgg": (2, 2, 2, 2),
    "tiny": (1, 1, 1, 1),
}


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class AudioVGG(nn.Module):
    """VGG-like log-mel encoder with stage-level feature access (``features(x, layer=...)``)."""

    def __init__(
        self,
        arch: str = "vgg",
        width: int = 64,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if arch not in AUDIO_ARCHS:
            raise ValueError(f"unknown audio arch {arch!r}; expected one of {sorted(AUDIO_ARCHS)}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.arch = arch
        self.width = width
        self.activation_checkpointing = activation_checkpointing
        channels = [width, width * 2, width * 4, width * 8]
        cin = 1
        for i, (cout, num_convs) in enumerate(zip(channels, AUDIO_ARCHS[arch], strict=True)):
            mods: list[nn.Module] = []
            for _ in range(num_convs):
                mods += _conv_bn_relu(cin, cout)
                cin = cout
            if i < 3:
                mods.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
            setattr(self, f"layer{i + 1}", nn.Sequential(*mods))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.feature_dim = channels[-1]
        self._channels = channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    @property
    def stage_names(self) -> list[str]:
        return ["layer1", "layer2", "layer3", "layer4", "pool"]

    def feature_dim_of(self, layer: str) -> int:
        if layer == "pool":
            return self.feature_dim
        return self._channels[self.stage_names.index(layer)]

    def features(self, x: torch.Tensor, layer: str = "pool", pooled: bool = True) -> torch.Tensor:
        """Output of ``layer``: [B, C] if pooled (or ``pool``), else [B, C, F', T']."""
        if layer not in self.stage_names:
            raise ValueError(f"unknown layer {layer!r}; expected one of {self.stage_names}")
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"expected log-mel [B, 1, F, T], got shape {list(x.shape)}")
        for i in range(1, 5):
            stage = getattr(self, f"layer{i}")
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint_stage(stage, x)
            else:
                x = stage(x)
            if layer == f"layer{i}":
                return x.mean(dim=(2, 3)) if pooled else x
        return self.avgpool(x).flatten(1)

    def forward(self, logmel_B1FT: torch.Tensor) -> torch.Tensor:
        return self.features(logmel_B1FT, layer="pool")


def audio_vgg(arch: str = "vgg", width: int = 64, **kwargs) -> AudioVGG:
    return AudioVGG(arch=arch, width=width, **kwargs)
