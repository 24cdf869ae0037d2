"""Callbacks a caller installs into a run. Production runs install none; the tests inject their
faults through them (``tests/fixtures/train_hooks.py``), so no test switch sits in the
training path."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["TrainHooks"]


@dataclass
class TrainHooks:
    # (optimizer step being taken, 1-based; this rank's micro-batch loss) -> the loss to use.
    on_loss: Callable[[int, torch.Tensor], torch.Tensor] | None = None
    # (event, step) at fixed points of a checkpoint save: "after_shards" once every rank's files
    # are written and gathered, before anything is published; "upload_started" (with
    # checkpoint.async_upload) in the upload thread, once this rank's first file is stored.
    on_checkpoint_event: Callable[[str, int], None] | None = None
