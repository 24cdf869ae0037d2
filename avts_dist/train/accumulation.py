"""Gradient accumulation over ``deepspeed.grad_accum_steps = k`` micro-batches, through
DeepSpeed's engine, with the negatives of the whole batch (``loss.negatives_scope=global``, the
default) or of each micro-batch alone (``micro``).

``global`` is the embedding cache of GradCache (Gao et al. 2021) and OpenCLIP's ``--accum-freq``:

1. a no-grad forward over every micro-batch keeps the model's outputs (embeddings, sync logits);
2. the loss is computed once over their concatenation, this rank's whole batch, with negatives
   gathered from every rank as at k = 1, and its gradient with respect to every kept output is
   kept;
3. each micro-batch is forwarded again with autograd and back-propagated from its rows of those
   gradients (``sum(output * grad)``), ``engine.backward`` once per micro-batch, so that
   DeepSpeed's accumulation boundary, its gradient all-reduce (sum / world size) and ZeRO's
   partitioned reduction are the ones of ordinary accumulation.

The gradients then equal those of one forward over all k micro-batches with autograd and one
backward of the whole batch's loss (``tests/integration/test_accumulation_exactness.py``), at
the memory of one micro-batch's activations, for about one extra forward. What makes it exact:

- BatchNorm normalises each micro-batch with its own statistics in both passes; its running
  statistics are put back after the no-grad pass, so they are updated once per micro-batch;
- the random state in front of each micro-batch's first forward is replayed in front of its
  second, and the state after the first pass is restored at the end (dropout masks agree, and the
  step draws as many numbers as one pass);
- ``engine.backward(..., scale_wrt_gas=False)``: the kept gradients already belong to the whole
  batch's mean, so DeepSpeed must not divide them by k again;
- a non-finite loss poisons the kept gradients with NaN, so every parameter gradient of the
  step is non-finite and the whole step is skipped (``engine.optimizer_step``), as at k = 1.

A model that forms in-batch negatives itself (``model.arch=early_fusion``'s extra easy columns)
forms them within the micro-batch it sees: only the loss's negatives become global.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from avts_dist.train.objectives import forward_loss, loss_on_outputs, model_outputs

__all__ = ["AccumulatedStep", "accumulate_gradients"]

LossHook = Callable[[torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class AccumulatedStep:
    terms: dict[str, torch.Tensor]  # the loss's terms: the whole batch's, or the last micro-batch's
    losses: list[torch.Tensor]  # detached fp32 losses: one (global) or one per micro-batch
    nonfinite: torch.Tensor  # 1.0 on the device when some loss of this rank was not finite


def accumulate_gradients(
    engine,
    loss_fn: Callable[..., dict[str, torch.Tensor]],
    parts: list[dict[str, Any]],
    *,
    objective: str,
    rank: int,
    world_size: int,
    negatives_scope: str = "global",
    on_loss: LossHook | None = None,
    **loss_kwargs: Any,
) -> AccumulatedStep:
    """Back-propagates this rank's batch, cut into ``parts``, through ``engine``: every
    ``engine.backward`` of the optimizer step, and ``engine.step()`` after each but the last
    (inside the accumulation DeepSpeed only counts it). The caller takes the last step."""
    common = dict(objective=objective, rank=rank, world_size=world_size, **loss_kwargs)
    if len(parts) == 1 or negatives_scope == "micro":
        return _per_micro_batch(engine, loss_fn, parts, on_loss, common)
    if negatives_scope != "global":
        raise ValueError(f"loss.negatives_scope must be global or micro, got {negatives_scope!r}")
    return _embedding_cache(engine, loss_fn, parts, on_loss, common)


def _per_micro_batch(engine, loss_fn, parts, on_loss, common) -> AccumulatedStep:
    """Each micro-batch's own loss (its negatives only), each backward scaled by 1/k."""
    nonfinite = None
    losses, terms = [], {}
    for i, part in enumerate(parts):
        terms = forward_loss(engine, loss_fn, part, **common)
        loss = terms["loss"]
        if on_loss is not None:
            loss = terms["loss"] = on_loss(loss)
        flag = (~torch.isfinite(loss.detach())).float()
        nonfinite = flag if nonfinite is None else torch.maximum(nonfinite, flag)
        losses.append(loss.detach().float())
        engine.backward(loss)
        if i < len(parts) - 1:
            engine.step()
    return AccumulatedStep(terms, losses, nonfinite)


def _embedding_cache(engine, loss_fn, parts, on_loss, common) -> AccumulatedStep:
    objective = common["objective"]
    device = parts[0]["video"].device
    running_stats = _BatchNormStats(engine.module)
    rng_before, cached = [], []
    with torch.no_grad():
        for part in parts:
            rng_before.append(_rng_state(device))
            cached.append(model_outputs(engine, part, objective=objective))
    rng_after = _rng_state(device)
    running_stats.restore()

    keys = list(cached[0])
    leaves = {k: torch.cat([c[k] for c in cached]).requires_grad_(True) for k in keys}
    whole = {k: torch.cat([p[k] for p in parts]) for k in ("neg_kind",) if k in parts[0]}
    terms = loss_on_outputs(loss_fn, leaves, whole, **common)
    loss = terms["loss"]
    if on_loss is not None:
        loss = on_loss(loss)
    nonfinite = (~torch.isfinite(loss.detach())).float()
    grads = torch.autograd.grad(loss, [leaves[k] for k in keys], allow_unused=True)
    rows = [c[keys[0]].shape[0] for c in cached]
    split = {}
    for key, grad in zip(keys, grads, strict=True):
        grad = torch.zeros_like(leaves[key]) if grad is None else grad
        grad = torch.where(nonfinite > 0, torch.full_like(grad, math.nan), grad)
        split[key] = grad.split(rows)

    for i, part in enumerate(parts):
        _set_rng_state(rng_before[i], device)
        out = model_outputs(engine, part, objective=objective)
        surrogate = sum((out[k].float() * split[k][i]).sum() for k in keys)
        engine.backward(surrogate, scale_wrt_gas=False)
        if i < len(parts) - 1:
            engine.step()
    _set_rng_state(rng_after, device)
    terms["loss"] = loss.detach()
    return AccumulatedStep(terms, [loss.detach().float()], nonfinite)


class _BatchNormStats:
    """The running statistics of every BatchNorm of ``model``, to put back after a pass that
    must not count."""

    def __init__(self, model: nn.Module) -> None:
        self.saved = [
            (buf, buf.detach().clone())
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            for buf in (m.running_mean, m.running_var, m.num_batches_tracked)
            if buf is not None
        ]

    def restore(self) -> None:
        with torch.no_grad():
            for buf, value in self.saved:
                buf.copy_(value)


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
