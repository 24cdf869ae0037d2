"""The pretraining run in MLflow (rank 0), written through the background writer.

- ``tracking.uri`` empty: the local store ``./mlruns`` (MLflow's file store; MLflow 3 keeps it in
  maintenance mode behind ``MLFLOW_ALLOW_FILE_STORE``, which this module sets); ``http://...``:
  a tracking server; any other MLflow URI (``sqlite:///...``) as is.
- Every call becomes a record of the run's outbox (``<run.dir>/tracking/``) that a background
  thread delivers (:mod:`avts_dist.tracking.writer`): the training loop never waits on MLflow,
  and an outage loses nothing.
- Params are the flattened resolved config with storage options redacted by an allowlist
  (:func:`avts_dist.secrets.redact`; passwords in URLs masked), so no credential reaches the store.
- Each saved checkpoint becomes a LoggedModel of the run (MLflow 3), with the step and the
  config as params; the weights stay in the checkpoint store, referenced by the
  ``avts.checkpoint`` tag, not copied.
- Resume: the outbox remembers the run, so a resumed run (``resume=auto`` or a path) continues
  it; the run id is also kept in the checkpoint and in ``<run.dir>/mlflow_run_id``. A fresh start
  (``resume=none``) starts a new run.

``mlflow`` is imported inside the functions on purpose: the import costs seconds, and a run with
``tracking.enabled=false`` (or a machine without mlflow) never needs it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from avts_dist.config import config_to_dict, flatten_config
from avts_dist.secrets import redact
from avts_dist.tracking.eval_runs import resolve_tracking_uri
from avts_dist.tracking.outbox import Outbox
from avts_dist.tracking.system import SystemMetricsSampler, node_id_for
from avts_dist.tracking.writer import TrackingWriter, configure_http

os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")

log = logging.getLogger("avts.tracking")

__all__ = [
    "NoTracking",
    "TrainRun",
    "open_node_metrics",
    "open_train_run",
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
    writer = None

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


class TrainRun:
    """The active pretraining run (rank 0): every method queues a record and returns."""

    def __init__(
        self,
        writer: TrackingWriter,
        *,
        run_name: str,
        flush_timeout_s: float,
        system_metrics: SystemMetricsSampler | None = None,
    ) -> None:
        self.writer = writer
        self.run_name = run_name
        self.flush_timeout_s = flush_timeout_s
        self._system = system_metrics
        self._params: dict[str, str] = {}

    @property
    def run_id(self) -> str:
        return self.writer.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        safe = _redacted_params(params)
        self._params.update(safe)
        self.writer.submit("params", params=safe)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        values = {}
        for key, value in metrics.items():
            if value is None or isinstance(value, bool):
                continue
            value = float(value)
            if math.isfinite(value):
                values[key.replace("@", "_")] = value
        if values:
            self.writer.submit(
                "metrics", step=int(step), ts=int(time.time() * 1000), metrics=values
            )

    def flush(self) -> None:
        """Nothing to do: records are on their way as soon as they are logged."""

    def set_tags(self, tags: dict[str, str]) -> None:
        self.writer.submit("tags", tags={k: str(v) for k, v in redact(dict(tags)).items()})

    def log_text(self, text: str, artifact_file: str) -> None:
        self.writer.submit("text", text=text, artifact_file=artifact_file)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self.log_text(json.dumps(data, indent=1, default=str), artifact_file)

    def log_checkpoint(self, url: str, step: int, save_s: float) -> None:
        """The checkpoint as a LoggedModel of this run (weights referenced by URL) and its save
        time as a metric of the run."""
        self.log_dict({"checkpoint": url, "step": step}, "checkpoints/latest.json")
        self.writer.submit(
            "model",
            step=int(step),
            name=f"{self.run_name}-step{int(step)}",
            params={**self._params, "step": str(int(step))},
            tags={"avts.checkpoint": redact(url), "avts.run_name": self.run_name},
        )
        self.log_metrics({"checkpoint/save_s": save_s}, step=step)

    def log_curriculum(self, history: list[dict[str, Any]], stage: str) -> None:
        self.log_dict({"events": history}, "curriculum/history.json")
        self.set_tags({"avts.curriculum_stage": stage})

    def end(self, status: str | None = "FINISHED") -> int:
        """status: FINISHED, KILLED (preempted: the run continues on resume), FAILED, or None
        (another node's system metrics: the run is not this process's to end).

        Waits at most ``tracking.flush_timeout_s`` for the backlog; returns the number of
        records left undelivered (kept for ``avts sync-tracking``)."""
        if self._system is not None:
            self._system.stop()
            self._system = None
        if status is not None:
            self.writer.submit("end", status=status)
        left = self.writer.close(self.flush_timeout_s)
        # What the writer did (outages, records handed over while the server was down, the
        # trainer's longest hand-over): for the operator and the tests.
        counters = {**self.writer.counters.to_dict(), "num_pending": left}
        (self.writer.outbox.folder / "writer.json").write_text(json.dumps(counters, indent=1))
        if left:
            log.warning(
                "MLflow %s: %d tracking record(s) not delivered (%s); they are kept in %s: "
                "`avts sync-tracking %s` sends them once the server answers",
                self.writer.tracking_uri,
                left,
                self.writer.last_error or "no answer in time",
                self.writer.outbox.path,
                self.writer.outbox.folder.parent,
            )
        return left


def _fresh_outbox(folder: Path) -> None:
    """A fresh start gets a new MLflow run: the previous outbox goes, or, with records still
    undelivered, is kept beside (``avts sync-tracking`` can deliver it to its own run)."""
    if not folder.exists():
        return
    old = Outbox(folder)
    if old.num_pending == 0:
        shutil.rmtree(folder)
        return
    keep = folder.with_name(f"{folder.name}.{old.state.tracking_id[:8]}")
    folder.rename(keep)
    log.warning(
        "%d undelivered tracking record(s) of the previous run in this run dir moved to %s "
        "(deliver them with `avts sync-tracking %s`)",
        old.num_pending,
        keep,
        keep,
    )


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

    Waits at most ``tracking.start_timeout_s`` for the server to create the run (so that its id
    is known from the start when the server is up); otherwise training starts anyway and the
    run is created when the server answers. Logs the redacted resolved config as params and as
    the ``config.yaml`` artifact.
    """
    tcfg = cfg.tracking
    configure_http(tcfg.request_timeout_s, tcfg.request_max_retries)
    run_dir = Path(run_dir)
    id_file = run_dir / "mlflow_run_id"
    folder = run_dir / "tracking"
    if cfg.resume in ("", "none"):
        _fresh_outbox(folder)
    elif not run_id and step > 0 and id_file.exists():
        run_id = id_file.read_text().strip()  # a run dir from before the outbox
    writer = TrackingWriter(
        Outbox(folder),
        tracking_uri_for(tcfg.uri),
        on_run_id=lambda rid: id_file.write_text(rid + "\n"),
    )
    tags = {**tcfg.tags, "mlflow.runName": cfg.run.name, "avts.kind": "pretrain"}
    tags["avts.world_size"] = str(world_size)
    start = writer.submit(
        "start",
        experiment=tcfg.experiment,
        run_name=cfg.run.name,
        tags=redact(tags),
        resume_run_id=run_id,
    )
    sampler = None
    if tcfg.system_metrics:
        sampler = SystemMetricsSampler(
            writer, node_id=node_id_for(0, world_size), interval_s=tcfg.system_metrics_every_s
        )
    run = TrainRun(
        writer, run_name=cfg.run.name, flush_timeout_s=tcfg.flush_timeout_s, system_metrics=sampler
    )
    run.log_params(flatten_config(cfg))
    run.log_text(yaml.safe_dump(redact(config_to_dict(cfg)), sort_keys=False), "config.yaml")
    if resumed_from:
        run.set_tags({"avts.resumed_from": resumed_from})
    if not writer.wait_delivered(start, tcfg.start_timeout_s):
        log.warning(
            "MLflow %s did not create the run within %ss: training starts; the run is "
            "created when the server answers",
            writer.tracking_uri,
            tcfg.start_timeout_s,
        )
    return run


def open_node_metrics(cfg, *, run_dir: Path, run_id: str, rank: int, world_size: int):
    """The system metrics of another node of a multi-node run (its first local rank): its own
    outbox under ``<run.dir>/tracking/<node id>/``, attached to the run; None when not needed."""
    node_id = node_id_for(rank, world_size)
    if not (cfg.tracking.enabled and cfg.tracking.system_metrics and run_id and node_id):
        return None
    configure_http(cfg.tracking.request_timeout_s, cfg.tracking.request_max_retries)
    outbox = Outbox(Path(run_dir) / "tracking" / node_id)
    outbox.state.run_id = run_id
    writer = TrackingWriter(outbox, tracking_uri_for(cfg.tracking.uri))
    return TrainRun(
        writer,
        run_name=cfg.run.name,
        flush_timeout_s=cfg.tracking.flush_timeout_s,
        system_metrics=SystemMetricsSampler(
            writer, node_id=node_id, interval_s=cfg.tracking.system_metrics_every_s
        ),
    )
