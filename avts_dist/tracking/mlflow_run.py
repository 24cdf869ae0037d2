"""The pretraining run in MLflow: started or resumed on rank 0 only.

- ``tracking.uri`` empty: the local store ``./mlruns`` (MLflow's file store; MLflow 3 keeps it in
  maintenance mode behind ``MLFLOW_ALLOW_FILE_STORE``, which this module sets); ``http://...``:
  a tracking server; any other MLflow URI (``sqlite:///...``) as is.
- Params are the flattened resolved config with storage options redacted by an allowlist
  (:func:`avts_dist.storage.redact`; passwords in URLs masked), so no credential reaches the store.
- Resume: the run id is kept in the checkpoint and in ``<run.dir>/mlflow_run_id``; the same run
  continues, its metrics go on at the resumed step.

``mlflow`` is imported inside the functions on purpose: the import costs seconds, and a run with
``tracking.enabled=false`` (or a machine without mlflow) never needs it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import yaml

from avts_dist.config import config_to_dict, flatten_config
from avts_dist.storage import redact
from avts_dist.tracking.eval_runs import resolve_tracking_uri

os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")

log = logging.getLogger("avts.tracking")

__all__ = [
    "NoTracking",
    "TrainRun",
    "open_train_run",
    "start_or_resume_run",
    "tracking_uri_for",
]

_PARAM_MAX = 6000


def tracking_uri_for(uri: str) -> str:
    return resolve_tracking_uri(uri)


def _redacted_params(params: dict[str, Any]) -> dict[str, str]:
    safe = redact(params)
    out = {}
    for key, value in safe.items():
        text = str(value)
        out[key] = text if len(text) <= _PARAM_MAX else text[: _PARAM_MAX - 3] + "..."
    return out


class NoTracking:
    """The tracker of ranks > 0 and of runs with ``tracking.enabled=false``: does nothing."""

    run_id = ""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


class TrainRun:
    """The active pretraining run (rank 0)."""

    def __init__(self, run_id: str, tracking_uri: str, system_metrics: bool) -> None:
        from mlflow import MlflowClient

        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self._monitor = None
        if system_metrics:
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                # tracking_uri must be explicit: otherwise the monitor logs to MLflow's global
                # default store (./mlflow.db), where this run does not exist.
                self._monitor = SystemMetricsMonitor(
                    run_id, sampling_interval=10, resume_logging=True, tracking_uri=tracking_uri
                )
                self._monitor.start()
            except Exception:  # psutil missing or an MLflow version without it: not fatal
                self._monitor = None
        self._pending: list = []
        self._last_flush = time.monotonic()

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, v) for k, v in _redacted_params(params).items() if k not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int, flush: bool = False) -> None:
        """Buffered; sent in batches (at most every few seconds) so logging never paces training."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if value is None:
                continue
            value = float(value)
            if math.isfinite(value):
                self._pending.append(Metric(key.replace("@", "_"), value, now, int(step)))
        if flush or len(self._pending) >= 900 or time.monotonic() - self._last_flush > 5:
            self.flush()

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for i in range(0, len(pending), 900):
            self.client.log_batch(self.run_id, metrics=pending[i : i + 900])
        self._last_flush = time.monotonic()

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in redact(dict(tags)).items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_checkpoint(self, url: str, step: int, save_s: float) -> None:
        self.log_dict({"checkpoint": url, "step": step}, "checkpoints/latest.json")
        self.log_metrics({"checkpoint/save_s": save_s}, step=step, flush=True)

    def log_curriculum(self, history: list[dict[str, Any]], stage: str) -> None:
        self.log_dict({"events": history}, "curriculum/history.json")
        self.set_tags({"avts.curriculum_stage": stage})

    def end(self, status: str = "FINISHED") -> None:
        """status: FINISHED, KILLED (preempted: the run continues on resume) or FAILED."""
        self.flush()
        if self._monitor is not None:
            with contextlib.suppress(Exception):
                self._monitor.finish()
            self._monitor = None
        self.client.set_terminated(self.run_id, status=status)


def start_or_resume_run(
    tracking_cfg,
    *,
    run_name: str,
    run_id: str = "",
    params: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
) -> TrainRun:
    """Creates the run (or reopens ``run_id``) in ``tracking_cfg.experiment``."""
    from mlflow import MlflowClient

    uri = tracking_uri_for(tracking_cfg.uri)
    client = MlflowClient(tracking_uri=uri)
    previous = ""
    if run_id:
        try:
            client.get_run(run_id)
        except Exception as exc:  # MlflowException: e.g. a checkpoint copied from elsewhere
            log.warning(
                "MLflow run %s (from the checkpoint) is not in %s (%s): starting a new run",
                run_id,
                uri,
                str(exc).splitlines()[0],
            )
            previous, run_id = run_id, ""
        else:
            client.update_run(run_id, status="RUNNING")
    if not run_id:
        exp = client.get_experiment_by_name(tracking_cfg.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(tracking_cfg.experiment)
        all_tags = {"mlflow.runName": run_name, "avts.kind": "pretrain"}
        if previous:
            all_tags["avts.previous_run_id"] = previous
        all_tags.update(tags or {})
        run_id = client.create_run(exp_id, tags=redact(all_tags), run_name=run_name).info.run_id
    run = TrainRun(run_id, uri, tracking_cfg.system_metrics)
    if params:
        run.log_params(params)
    return run


def open_train_run(
    cfg,
    *,
    run_dir: Path,
    run_id: str = "",
    step: int = 0,
    resumed_from: str = "",
    world_size: int = 1,
) -> TrainRun:
    """Rank 0 of a pretraining run: the MLflow run started, or continued on resume.

    The run id comes from the checkpoint (``run_id``) or, for a run resumed past its last
    checkpoint's tracking, from ``<run_dir>/mlflow_run_id``, which is (re)written here. Logs the
    redacted resolved config as params and as the ``config.yaml`` artifact.
    """
    id_file = Path(run_dir) / "mlflow_run_id"
    if not run_id and step > 0 and id_file.exists():
        run_id = id_file.read_text().strip()
    run = start_or_resume_run(
        cfg.tracking,
        run_name=cfg.run.name,
        run_id=run_id,
        params=flatten_config(cfg),
        tags={**cfg.tracking.tags, "avts.world_size": str(world_size)},
    )
    id_file.write_text(run.run_id + "\n")
    run.log_text(yaml.safe_dump(redact(config_to_dict(cfg)), sort_keys=False), "config.yaml")
    if resumed_from:
        run.set_tags({"avts.resumed_from": resumed_from})
    return run
