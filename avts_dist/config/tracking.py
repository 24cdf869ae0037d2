"""``tracking``: the MLflow store, tags, and how long MLflow calls may take."""

from __future__ import annotations

from dataclasses import dataclass, field

from avts_dist.config.common import fail

__all__ = ["TrackingConfig"]


@dataclass
class TrackingConfig:
    enabled: bool = True
    # Empty means a local store at ./mlruns; http://host:port for a tracking server.
    uri: str = ""
    experiment: str = "avts"
    system_metrics: bool = True
    # Set on the MLflow run of `avts train` and of every `avts eval` job; `avts study` groups its
    # runs by them (avts.study, avts.arm, avts.pretrain_seed).
    tags: dict[str, str] = field(default_factory=dict)
    system_metrics_every_s: float = 10.0
    # Every MLflow HTTP call of the trainer is bounded by these (MLflow's own
    # MLFLOW_HTTP_REQUEST_TIMEOUT / _MAX_RETRIES, which win when set); a background thread makes
    # the calls, so they bound how soon an outage is noticed, never a training step.
    request_timeout_s: int = 10
    request_max_retries: int = 1
    # How long the start waits for the server to create the run (then training starts anyway),
    # and how long the end waits to deliver the backlog (the rest: avts sync-tracking RUN_DIR).
    start_timeout_s: float = 30.0
    flush_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.request_timeout_s < 1:
            fail("tracking.request_timeout_s", "must be >= 1")
        if self.request_max_retries < 0:
            fail("tracking.request_max_retries", "must be >= 0")
        if self.system_metrics_every_s <= 0:
            fail("tracking.system_metrics_every_s", "must be > 0")
        if self.start_timeout_s < 0 or self.flush_timeout_s < 0:
            fail("tracking.start_timeout_s", "start_timeout_s and flush_timeout_s must be >= 0")
