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

__all__ = ["forward_loss", "loss_on_outputs", "model_outputs"]


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
    outputs = model_outputs(model, batch, objective=objective)
    return loss_on_outputs(
        loss_fn, outputs, batch, objective=objective, rank=rank, world_size=world_size,
        **loss_kwargs,
    )  # fmt: skip


def model_outputs(
    model: Callable[..., dict[str, torch.Tensor | None]],
    batch: dict[str, Any],
    *,
    objective: str,
) -> dict[str, torch.Tensor]:
    """What the loss reads of the model's output for ``batch``: its tensors, one row per sample
    (``train/accumulation.py`` caches them across micro-batches)."""
    if objective == "video_ssl":
        return model(batch["video"], batch["video2"])
    emb = model(batch["video"], batch["audio"], batch["neg_audio"])
    # fp32 before the gather, so that its backward reduce-scatter sums gradients in fp32.
    return {k: v.float() for k, v in emb.items() if v is not None}


def loss_on_outputs(
    loss_fn: Callable[..., dict[str, torch.Tensor]],
    outputs: dict[str, torch.Tensor],
    batch: dict[str, Any],
    *,
    objective: str,
    rank: int,
    world_size: int,
    **loss_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """``loss_fn``'s terms for the model outputs of ``batch`` (:func:`model_outputs`)."""
    if objective == "video_ssl":
        return loss_fn(outputs["view1_emb"], outputs["view2_emb"], rank=rank, world_size=world_size)
    return loss_fn(
        outputs.get("video_emb"),
        outputs.get("audio_emb"),
        outputs.get("neg_audio_emb"),
        batch["neg_kind"],
        rank=rank,
        world_size=world_size,
        sync_logit=outputs.get("sync_logit"),
        neg_sync_logit=outputs.get("neg_sync_logit"),
        **loss_kwargs,
    )
