"""avts_dist.tracking: MLflow for the pretraining run (rank 0) and its evaluation child runs,
and the per-step metrics logger (``metrics.jsonl`` + MLflow)."""

from avts_dist.tracking.metrics import MetricsLogger, ProgressBar, StepRecord, StepTimer
from avts_dist.tracking.mlflow_run import (
    NoTracking,
    TrainRun,
    open_train_run,
    start_or_resume_run,
    tracking_uri_for,
)

__all__ = [
    "MetricsLogger",
    "NoTracking",
    "ProgressBar",
    "StepRecord",
    "StepTimer",
    "TrainRun",
    "open_train_run",
    "start_or_resume_run",
    "tracking_uri_for",
]
