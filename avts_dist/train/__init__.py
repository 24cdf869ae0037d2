"""avts_dist.train: the DeepSpeed pretraining loop, its checkpoints and ``run_training``.

Lazy: importing the package (or its light parts, ``avts_dist.train.checkpoint``) loads no
trainer. The names below are imported from their modules on first use, so that ``avts status``,
``avts export`` and ``avts eval`` do not load the training stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from avts_dist.train.checkpoint import (
        CheckpointError,
        CheckpointManager,
        CheckpointRef,
        ResumePlan,
        list_checkpoints,
        resolve_checkpoint,
    )
    from avts_dist.train.hooks import TrainHooks
    from avts_dist.train.run import run_training
    from avts_dist.train.trainer import Trainer, TrainResult

# name -> the module that defines it
_LAZY = {
    "CheckpointError": "avts_dist.train.checkpoint",
    "CheckpointManager": "avts_dist.train.checkpoint",
    "CheckpointRef": "avts_dist.train.checkpoint",
    "ResumePlan": "avts_dist.train.checkpoint",
    "list_checkpoints": "avts_dist.train.checkpoint",
    "resolve_checkpoint": "avts_dist.train.checkpoint",
    "TrainHooks": "avts_dist.train.hooks",
    "run_training": "avts_dist.train.run",
    "TrainResult": "avts_dist.train.trainer",
    "Trainer": "avts_dist.train.trainer",
}

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "CheckpointRef",
    "ResumePlan",
    "TrainHooks",
    "TrainResult",
    "Trainer",
    "list_checkpoints",
    "resolve_checkpoint",
    "run_training",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
