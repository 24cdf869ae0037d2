"""Held-out accuracy during pretraining, on full global batches of ``data.val_split``.

AVTS: sync accuracy, scored once with easy negatives only and once with hard negatives only
(``val/sync_acc_easy``, ``val/sync_acc_hard``: the loss's balanced accuracy of its sync
decision). ``train.objective=video_ssl``: two views of each held-out clip, ``val/view_acc``: how
often a view's other view ranks first among the global batch's candidates (the loss's
``acc/view``)."""

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
# The video_ssl objective's one validation loader, and the loss metric it reports.
VIEWS = "views"


def build_val_loaders(
    data: DataConfig,
    *,
    rank: int,
    world_size: int,
    pin_memory: bool = False,
    views: bool = False,
) -> dict[str, Any]:
    """One evaluation loader per negative kind, or one of two-view samples with ``views``
    (the same held-out windows on every pass)."""
    if views:
        loader = build_loader(
            data, rank=rank, world_size=world_size, train=False, views=True, pin_memory=pin_memory
        )
        return {VIEWS: loader}
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


def _metric_names(kind: str) -> tuple[str, str]:
    """(loss output key, logged name) of a validation loader."""
    if kind == VIEWS:
        return "acc/view", "val/view_acc"
    return f"acc/{kind}", f"val/sync_acc_{kind}"


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
        key, name = _metric_names(kind)
        # Only full global batches: every rank must take part in each gathered loss.
        num_batches = min(max_batches, len(loader.sampler) // global_batch_size)
        accs = []
        batches = iter(loader)
        for _ in range(num_batches):
            reduced = reduce_metrics(score(next(batches)), world_size)
            if key in reduced:
                accs.append(reduced[key])
        batches.close()
        if accs:
            results[name] = sum(accs) / len(accs)
    return results
