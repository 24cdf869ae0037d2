"""avts_dist.train: the DeepSpeed pretraining loop, its checkpoints and ``run_training``."""

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
