"""A training run's tracking, opened once on every rank: the MLflow run (rank 0), another
node's system metrics (local rank 0 of each other node) and the fields of the progress line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avts_dist.config import save_config
from avts_dist.distributed import collectives as C
from avts_dist.tracking.metrics import MetricsLogger
from avts_dist.tracking.mlflow_run import NoTracking, open_node_metrics, open_train_run

__all__ = ["RunTracking", "open_tracking", "progress_fields"]


@dataclass
class RunTracking:
    tracker: Any  # TrainRun on rank 0 when tracking is enabled, else NoTracking
    run_id: str  # the MLflow run id, identical on every rank ("" without tracking)
    node_metrics: Any = None  # another node's system-metrics sampler (multi-node runs)


def open_tracking(
    cfg,
    metrics: MetricsLogger,
    *,
    run_dir: Path,
    step: int,
    run_id: str,
    resumed_from: str,
    rank: int,
    local_rank: int,
    world_size: int,
) -> RunTracking:
    """Rank 0: config.yaml, metrics.jsonl cut back to the resumed ``step``, the MLflow run
    (``run_id``: the one to continue, from the checkpoint). Collective: every rank calls it."""
    tracker = NoTracking()
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        metrics.truncate_after(step)
        if cfg.tracking.enabled:
            tracker = metrics.tracker = open_train_run(
                cfg, run_dir=run_dir, run_id=run_id, step=step, resumed_from=resumed_from,
                world_size=world_size,
            )  # fmt: skip
    run_id = C.broadcast_object(tracker.run_id or run_id)
    node_metrics = None
    if rank != 0 and local_rank == 0:
        node_metrics = open_node_metrics(
            cfg, run_dir=run_dir, run_id=run_id, rank=rank, world_size=world_size
        )
    return RunTracking(tracker, run_id, node_metrics)


def progress_fields(metrics: MetricsLogger, tracker) -> dict[str, Any]:
    """The progress line's fields: last loss, data wait, retries, and a word on the tracker when
    it is not delivering."""
    latest, writer = metrics.latest, tracker.writer
    tracking = None
    if writer is not None and writer.is_down:
        tracking = f"MLflow down, {writer.outbox.num_pending} records buffered"
    return {
        "loss": metrics.last_loss,
        "data_wait": latest.get("data/wait_fraction"),
        "retries": latest.get("data/retries"),
        "tracking": tracking,
    }
