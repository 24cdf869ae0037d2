"""The forward pass and loss of one batch, per ``train.objective``.

- ``avts``: video, audio and negative audio through the model (two-stream or early fusion), then
  the AVTS loss (contrastive + sync BCE; BCE only for early fusion, which has no embeddings).
- ``video_ssl``: two windows of the same clip through the video net and its projection head,
  then two-view InfoNCE; the AVTS loss's keyword arguments (negative-kind weights, step) do not
  apply and are ignored.

The training step and validation both call :func:`forward_loss`, so they cannot disagree on what
a batch means.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["forward_loss"]


def forward_loss(
    model: Callable[..., dict[str, torch.Tensor | None]],
    loss_fn: Callable[..., dict[str, torch.Tensor]],
    batch: dict[str, Any],
    *,
    objective: str,
    rank: int,
    world_size: int,
    **loss_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """``loss_fn``'s terms (``loss`` among them) for ``batch`` (already on the device)."""
    if objective == "video_ssl":
        views = model(batch["video"], batch["video2"])
        return loss_fn(views["view1_emb"], views["view2_emb"], rank=rank, world_size=world_size)
    emb = model(batch["video"], batch["audio"], batch["neg_audio"])
    # fp32 before the gather, so that its backward reduce-scatter sums gradients in fp32.
    emb = {k: v.float() for k, v in emb.items() if v is not None}
    return loss_fn(
        emb.get("video_emb"),
        emb.get("audio_emb"),
        emb.get("neg_audio_emb"),
        batch["neg_kind"],
        rank=rank,
        world_size=world_size,
        sync_logit=emb.get("sync_logit"),
        neg_sync_logit=emb.get("neg_sync_logit"),
        **loss_kwargs,
    )
