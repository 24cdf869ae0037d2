"""avts_dist.train: the DeepSpeed pretraining loop, its checkpoints and ``run_training``."""

from avts_dist.train.checkpoint import CheckpointManager, find_latest_complete
from avts_dist.train.run import run_training
from avts_dist.train.trainer import Trainer, TrainResult

__all__ = ["CheckpointManager", "TrainResult", "Trainer", "find_latest_complete", "run_training"]
