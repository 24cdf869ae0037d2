"""avts_dist.tracking: MLflow for the pretraining run (rank 0) and its evaluation child runs."""

from avts_dist.tracking.mlflow_run import (
    TrainRun,
    start_child_run,
    start_or_resume_run,
    tracking_uri_for,
)

__all__ = ["TrainRun", "start_child_run", "start_or_resume_run", "tracking_uri_for"]
