"""Held-out sync accuracy during pretraining: full global batches of ``data.val_split``, scored
once with easy negatives only and once with hard negatives only (``val/sync_acc_easy``,
``val/sync_acc_hard``: the loss's balanced accuracy of its sync decision)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from avts_dist.config import DataConfig
from avts_dist.data import build_loader
from avts_dist.losses import reduce_metrics

__all__ = ["VAL_KINDS", "build_val_loaders", "sync_accuracy"]

VAL_KINDS = ("easy", "hard")


def build_val_loaders(
    data: DataConfig, *, rank: int, world_size: int, pin_memory: bool = False
) -> dict[str, Any]:
    """One evaluation loader per negative kind (the same held-out windows on every pass)."""
    return {
        kind: build_loader(
            dataclasses.replace(data, negative_mix={kind: 1.0}),
            rank=rank,
            world_size=world_size,
            train=False,
            pin_memory=pin_memory,
        )
        for kind in VAL_KINDS
    }


@torch.no_grad()
def sync_accuracy(
    score: Callable[[dict[str, Any]], dict[str, torch.Tensor]],
    loaders: dict[str, Any],
    *,
    max_batches: int,
    global_batch_size: int,
    world_size: int,
) -> dict[str, float]:
    """``score(batch)`` is the loss output of one batch; the accuracies are reduced over ranks."""
    results: dict[str, float] = {}
    for kind, loader in loaders.items():
        # Only full global batches: every rank must take part in each gathered loss.
        num_batches = min(max_batches, len(loader.sampler) // global_batch_size)
        accs = []
        batches = iter(loader)
        for _ in range(num_batches):
            reduced = reduce_metrics(score(next(batches)), world_size)
            if f"acc/{kind}" in reduced:
                accs.append(reduced[f"acc/{kind}"])
        batches.close()
        if accs:
            results[f"val/sync_acc_{kind}"] = sum(accs) / len(accs)
    return results
