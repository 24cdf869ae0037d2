"""A loader batch onto the run's device: it crosses once, and only the media change dtype.

Video (``video``, and ``video2``: the second view of ``train.objective=video_ssl``) may arrive
as uint8 ``[B, 3, T, H, W]`` (a quarter of float32's bytes over PCIe): it is
cast and Kinetics-normalised on the device. Only media (``video``, ``audio``, ``neg_audio``) may
change dtype (to ``dtype`` when one is given; the trainer gives none: under bf16 autocast each
convolution casts its own input). Everything else keeps its dtype: labels and indices stay
integers, float64 start times stay float64.
"""

from __future__ import annotations

from typing import Any

import torch

from avts_dist.data.decode import KINETICS_MEAN, KINETICS_STD

__all__ = ["MEDIA_KEYS", "micro_batches", "normalize_video", "to_device"]

MEDIA_KEYS = ("video", "video2", "audio", "neg_audio")
VIDEO_KEYS = ("video", "video2")


def normalize_video(video_u8_BCTHW: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 frames -> Kinetics-normalised ``dtype``, computed in fp32 where the tensor lives."""
    shape = (1, 3, 1, 1, 1)
    mean = torch.tensor(KINETICS_MEAN, device=video_u8_BCTHW.device).view(shape)
    std = torch.tensor(KINETICS_STD, device=video_u8_BCTHW.device).view(shape)
    return ((video_u8_BCTHW.float() / 255.0 - mean) / std).to(dtype)


def to_device(
    batch: dict[str, Any], device: torch.device, dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """``batch`` on ``device``; ``dtype`` is the compute dtype of the media (None: unchanged)."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            if device.type == "cuda" and not value.is_pinned():
                # non_blocking copies only overlap from page-locked memory.
                value = value.pin_memory()
            value = value.to(device, non_blocking=True)
            if key in VIDEO_KEYS and value.dtype == torch.uint8:
                value = normalize_video(value, dtype or torch.float32)
            elif key in MEDIA_KEYS and dtype is not None:
                value = value.to(dtype)
        out[key] = value
    return out


def micro_batches(batch: dict[str, Any], num: int) -> list[dict[str, Any]]:
    """The model inputs of ``batch`` (those it has: an AVTS pair batch or a two-view batch) cut
    into ``num`` equal micro-batches (gradient accumulation)."""
    rows = batch["video"].shape[0] // num
    keys = [k for k in (*MEDIA_KEYS, "neg_kind") if k in batch]
    return [{k: batch[k][i * rows : (i + 1) * rows] for k in keys} for i in range(num)]
