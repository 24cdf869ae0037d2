"""Video subnetworks: R(2+1)D-18, MC3-18 and R3D-18.

The module tree mirrors torchvision's ``torchvision/models/video/resnet.py`` attribute for
attribute (``stem``, ``layerN.i.conv1.0``, ``downsample.0``, ``fc``...), so the state_dict of a
default-width net has exactly torchvision's key names and shapes and its published Kinetics-400
weights load with ``strict=True``. torchvision itself is not a dependency.

Beyond torchvision: ``width`` / ``layers`` shrink the nets for CPU, ``features(x, layer=...)``
reads any stage, activation checkpointing per stage and ``channels_last_3d`` are options.
Architecture only: no distributed code here (parallelism is applied from outside).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

__all__ = [
    "VIDEO_ARCHS",
    "BasicBlock",
    "Conv2Plus1D",
    "Conv3DNoTemporal",
    "Conv3DSimple",
    "VideoResNet",
    "checkpoint_stage",
    "load_torchvision_weights",
    "mc3_18",
    "r2plus1d_18",
    "r3d_18",
    "video_resnet",
]


class _KeepBatchNormStats:
    """Restores BN running statistics after a checkpoint's recomputation.

    Recomputing a stage in backward runs its BatchNorms in train mode a second time, which
    would apply the running-stat momentum twice per step; this undoes the second update so a
    checkpointed net ends each step with exactly the statistics of a plain one.
    """

    def __init__(self, module: nn.Module) -> None:
        self.norms = [
            m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats
        ]
        self.saved: list[tuple[torch.Tensor, ...]] = []

    def __enter__(self) -> None:
        self.saved = [
            (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
            for m in self.norms
        ]

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for m, (mean, var, count) in zip(self.norms, self.saved, strict=True):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
        self.saved = []


def checkpoint_stage(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` with activation checkpointing (non-reentrant, BN statistics kept exact)."""
    return checkpoint(
        module,
        x,
        use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _KeepBatchNormStats(module)),
    )


class Conv3DSimple(nn.Conv3d):
    """Full 3x3x3 convolution (R3D everywhere, MC3's first stage)."""

    def __init__(
        self, in_planes: int, out_planes: int, midplanes: int | None = None, stride: int = 1
    ) -> None:
        super().__init__(in_planes, out_planes, (3, 3, 3), stride=stride, padding=1, bias=False)

    @staticmethod
    def get_downsample_stride(stride: int) -> tuple[int, int, int]:
        return stride, stride, stride


class Conv2Plus1D(nn.Sequential):
    """(2+1)D factorisation: 1x3x3 spatial conv, BN, ReLU, 3x1x1 temporal conv."""

    def __init__(self, in_planes: int, out_planes: int, midplanes: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv3d(
                in_planes,
                midplanes,
                (1, 3, 3),
                stride=(1, stride, stride),
                padding=(0, 1, 1),
                bias=False,
            ),
            nn.BatchNorm3d(midplanes),
            nn.ReLU(inplace=True),
            nn.Conv3d(
                midplanes,
                out_planes,
                (3, 1, 1),
                stride=(stride, 1, 1),
                padding=(1, 0, 0),
                bias=False,
            ),
        )

    @staticmethod
    def get_downsample_stride(stride: int) -> tuple[int, int, int]:
        return stride, stride, stride


class Conv3DNoTemporal(nn.Conv3d):
    """Spatial-only 1x3x3 convolution (MC3's stages 2-4): time is never strided."""

    def __init__(
        self, in_planes: int, out_planes: int, midplanes: int | None = None, stride: int = 1
    ) -> None:
        super().__init__(
            in_planes,
            out_planes,
            (1, 3, 3),
            stride=(1, stride, stride),
            padding=(0, 1, 1),
            bias=False,
        )

    @staticmethod
    def get_downsample_stride(stride: int) -> tuple[int, int, int]:
        return 1, stride, stride


ConvBuilder = type[Conv3DSimple] | type[Conv2Plus1D] | type[Conv3DNoTemporal]


def _midplanes(inplanes: int, planes: int) -> int:
    # torchvision's formula: the (2+1)D block gets about the parameters of a full 3x3x3 conv.
    return (inplanes * planes * 3 * 3 * 3) // (inplanes * 3 * 3 + 3 * planes)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        conv_builder: ConvBuilder,
        stride: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        midplanes = _midplanes(inplanes, planes)
        self.conv1 = nn.Sequential(
            conv_builder(inplanes, planes, midplanes, stride),
            nn.BatchNorm3d(planes),
            nn.ReLU(inplace=True),
        )
        self.conv2 = nn.Sequential(conv_builder(planes, planes, midplanes), nn.BatchNorm3d(planes))
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.conv1(x))
        return self.relu(out + residual)


class BasicStem(nn.Sequential):
    """conv(3x7x7, stride 1x2x2)-BN-ReLU."""

    def __init__(self, width: int = 64) -> None:
        super().__init__(
            nn.Conv3d(3, width, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
            nn.BatchNorm3d(width),
            nn.ReLU(inplace=True),
        )


class R2Plus1dStem(nn.Sequential):
    """Factorised stem: 1x7x7 spatial (45 channels at width 64), then 3x1x1 temporal."""

    def __init__(self, width: int = 64) -> None:
        # torchvision hard-codes 45 mid channels for width 64; scale it for narrow variants.
        mid = max(1, (45 * width) // 64)
        super().__init__(
            nn.Conv3d(3, mid, (1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False),
            nn.BatchNorm3d(mid),
            nn.ReLU(inplace=True),
            nn.Conv3d(mid, width, (3, 1, 1), stride=(1, 1, 1), padding=(1, 0, 0), bias=False),
            nn.BatchNorm3d(width),
            nn.ReLU(inplace=True),
        )


# arch -> (stem, conv builder per stage)
VIDEO_ARCHS: dict[str, tuple[Callable[[int], nn.Module], list[ConvBuilder]]] = {
    "r3d_18": (BasicStem, [Conv3DSimple] * 4),
    "mc3_18": (BasicStem, [Conv3DSimple] + [Conv3DNoTemporal] * 3),
    "r2plus1d_18": (R2Plus1dStem, [Conv2Plus1D] * 4),
}


class VideoResNet(nn.Module):
    """torchvision's VideoResNet with width/depth options and stage-level feature access.

    Input ``video_BCTHW`` (RGB, normalised). ``forward`` returns class logits when the net has
    a ``fc`` head (``num_classes > 0``, torchvision's layout) and pooled features otherwise.
    """

    def __init__(
        self,
        arch: str = "r2plus1d_18",
        layers: Sequence[int] = (2, 2, 2, 2),
        width: int = 64,
        num_classes: int = 400,
        activation_checkpointing: bool = False,
        channels_last_3d: bool = False,
    ) -> None:
        super().__init__()
        if arch not in VIDEO_ARCHS:
            raise ValueError(f"unknown video arch {arch!r}; expected one of {sorted(VIDEO_ARCHS)}")
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ValueError(f"layers must be four stage depths >= 1, got {list(layers)}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        stem, conv_makers = VIDEO_ARCHS[arch]
        self.arch = arch
        self.width = width
        self.layers = list(layers)
        self.activation_checkpointing = activation_checkpointing
        self.channels_last_3d = channels_last_3d
        self.inplanes = width
        self.stem = stem(width)
        self.layer1 = self._make_layer(conv_makers[0], width, layers[0], stride=1)
        self.layer2 = self._make_layer(conv_makers[1], width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(conv_makers[2], width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(conv_makers[3], width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool3d((1, 1, 1))
        self.feature_dim = width * 8 * BasicBlock.expansion
        self.num_classes = num_classes
        # No head means no `fc.*` keys: the backbone used for pretraining (see load_torchvision_weights).
        self.fc = nn.Linear(self.feature_dim, num_classes) if num_classes > 0 else None
        self._initialize_weights()
        if channels_last_3d:
            self.to(memory_format=torch.channels_last_3d)

    def _make_layer(
        self, conv_builder: ConvBuilder, planes: int, blocks: int, stride: int
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                nn.Conv3d(
                    self.inplanes,
                    planes * BasicBlock.expansion,
                    kernel_size=1,
                    stride=conv_builder.get_downsample_stride(stride),
                    bias=False,
                ),
                nn.BatchNorm3d(planes * BasicBlock.expansion),
            )
        blocks_list = [BasicBlock(self.inplanes, planes, conv_builder, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        blocks_list += [BasicBlock(self.inplanes, planes, conv_builder) for _ in range(1, blocks)]
        return nn.Sequential(*blocks_list)

    def _initialize_weights(self) -> None:
        # Same scheme as torchvision, so from-scratch baselines match theirs.
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    # -- stage access ---------------------------------------------------------------------------

    @property
    def stage_names(self) -> list[str]:
        """Names accepted by ``features(layer=...)``: stages, blocks (``layer3.1``) and ``pool``."""
        names = ["stem"]
        for i in range(1, 5):
            stage = getattr(self, f"layer{i}")
            names += [f"layer{i}.{j}" for j in range(len(stage))] + [f"layer{i}"]
        return [*names, "pool"]

    def _run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint_stage(module, x)
        return module(x)

    def features(self, x: torch.Tensor, layer: str = "pool", pooled: bool = True) -> torch.Tensor:
        """Output of ``layer`` (see ``stage_names``): [B, C] if pooled, else [B, C, T, H, W]."""
        if layer not in self.stage_names:
            raise ValueError(f"unknown layer {layer!r}; expected one of {self.stage_names}")
        if self.channels_last_3d:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        x = self._run(self.stem, x)
        if layer == "stem":
            return _maybe_pool(x, pooled)
        for i in range(1, 5):
            stage = getattr(self, f"layer{i}")
            if self.activation_checkpointing and layer not in (
                f"layer{i}.{j}" for j in range(len(stage))
            ):
                x = self._run(stage, x)
            else:
                for j, block in enumerate(stage):
                    x = self._run(block, x)
                    if layer == f"layer{i}.{j}":
                        return _maybe_pool(x, pooled)
            if layer == f"layer{i}":
                return _maybe_pool(x, pooled)
        return self.avgpool(x).flatten(1)

    def forward(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        feats = self.features(video_BCTHW, layer="pool")
        return feats if self.fc is None else self.fc(feats)

    def feature_dim_of(self, layer: str) -> int:
        """Channel count of ``layer``'s output."""
        if layer in ("pool", "layer4") or layer.startswith("layer4."):
            return self.feature_dim
        if layer == "stem":
            return self.width
        return self.width * 2 ** (int(layer[5]) - 1)


def _maybe_pool(x: torch.Tensor, pooled: bool) -> torch.Tensor:
    return x.mean(dim=(2, 3, 4)) if pooled else x


def video_resnet(arch: str, **kwargs) -> VideoResNet:
    return VideoResNet(arch=arch, **kwargs)


def r3d_18(**kwargs) -> VideoResNet:
    """R3D-18 (Tran et al. 2018): torchvision ``r3d_18``'s state_dict layout."""
    return VideoResNet(arch="r3d_18", **kwargs)


def mc3_18(**kwargs) -> VideoResNet:
    """MC3-18 (3D conv in stage 1, 2D after): torchvision ``mc3_18``'s state_dict layout."""
    return VideoResNet(arch="mc3_18", **kwargs)


def r2plus1d_18(**kwargs) -> VideoResNet:
    """R(2+1)D-18: torchvision ``r2plus1d_18``'s state_dict layout."""
    return VideoResNet(arch="r2plus1d_18", **kwargs)


def load_torchvision_weights(
    net: VideoResNet, state_dict: dict[str, torch.Tensor], strict: bool = True
) -> None:
    """Loads torchvision video weights (e.g. ``r2plus1d_18-91a641e6.pth``) into ``net``.

    A headless backbone (``num_classes=0``) drops the checkpoint's ``fc.*`` keys; a net with a
    400-way head takes them. Every other key must match exactly when ``strict``.
    """
    if net.fc is None:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    net.load_state_dict(state_dict, strict=strict)
