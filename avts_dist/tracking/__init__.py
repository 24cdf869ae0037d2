"""avts_dist.tracking: MLflow for the pretraining run (rank 0, through a background writer and
an outbox in the run dir) and its evaluation child runs, the per-step metrics logger
(``metrics.jsonl`` + MLflow) and the progress display.

Names are imported on first use (PEP 562), so that a light reader such as ``avts status``
importing :mod:`avts_dist.tracking.progress` does not load torch with the metrics logger.
"""

import importlib

_EXPORTS = {
    "MetricsLogger": "metrics",
    "StepRecord": "metrics",
    "StepTimer": "metrics",
    "sum_over_ranks": "metrics",
    "telemetry_fields": "metrics",
    "NoTracking": "mlflow_run",
    "TrainRun": "mlflow_run",
    "open_node_metrics": "mlflow_run",
    "open_train_run": "mlflow_run",
    "tracking_uri_for": "mlflow_run",
    "Progress": "progress",
    "RunTracking": "session",
    "open_tracking": "session",
    "progress_fields": "session",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'avts_dist.tracking' has no attribute {name!r}")
    return getattr(importlib.import_module(f"avts_dist.tracking.{_EXPORTS[name]}"), name)
