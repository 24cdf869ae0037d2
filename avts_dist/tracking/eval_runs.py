"""MLflow child runs for evaluation jobs: one run per job, nested under the pretraining run.

The child lives in the parent's experiment with the ``mlflow.parentRunId`` tag (what the MLflow
UI and ``avts compare`` use to group it), plus ``avts.kind=eval`` and ``avts.eval=<job>``.
When the weights are a checkpoint of a tracked pretraining run, its metrics are linked to that
checkpoint's LoggedModel (``model_id``; found with :func:`find_checkpoint_model`), which is how
``avts compare --best`` ranks checkpoints. Everything goes through :class:`mlflow.MlflowClient`
with an explicit tracking URI, so nothing depends on (or changes) the process-global active run.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    from mlflow import MlflowClient

# MLflow 3 keeps the local file store (./mlruns, the default here) behind this switch, which it
# reads each time a store is opened.
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
# MLflow prints "View run ... at: URL" on stdout when a run on a server ends: stdout belongs to
# our commands (`avts eval --json`), which print the run's link themselves.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

__all__ = ["EvalRun", "find_checkpoint_model", "resolve_tracking_uri", "run_url"]


def resolve_tracking_uri(uri: str) -> str:
    """A tracking URI as MLflow takes it (``http://...``, ``file:...``, ``sqlite:///...``); a
    plain path becomes an absolute ``file:`` URI; empty means the local store ``./mlruns``."""
    if uri and urlparse(uri).scheme:
        return uri
    return Path(uri or "mlruns").resolve().as_uri()


def find_checkpoint_model(client: MlflowClient, run_id: str, step: int) -> str:
    """The LoggedModel id of the checkpoint the pretraining run ``run_id`` saved at ``step``
    (see ``TrainRun.log_checkpoint``); empty when there is none."""
    try:
        experiment_id = client.get_run(run_id).info.experiment_id
        found = client.search_logged_models(
            [experiment_id],
            filter_string=f"source_run_id = '{run_id}' AND tags.`avts.step` = '{int(step)}'",
            max_results=1,
        )
    except Exception:  # MlflowException: unknown run, a store without LoggedModels
        return ""
    return found[0].model_id if found else ""


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI (a tracking server), else the run id."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return run_id


class EvalRun:
    """A started child run; ``log_*`` methods write to it, ``end(status)`` closes it."""

    def __init__(
        self,
        job: str,
        *,
        tracking_uri: str,
        parent_run_id: str = "",
        experiment: str = "avts",
        tags: dict[str, str] | None = None,
        checkpoint_step: int | None = None,
    ) -> None:
        # mlflow on first use: ``import avts_dist.train`` (through resolve_tracking_uri) runs
        # without it when tracking is off.
        from mlflow import MlflowClient

        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment_id = None
        if parent_run_id:
            try:
                experiment_id = self.client.get_run(parent_run_id).info.experiment_id
            except Exception as exc:  # MlflowException for an unknown id; keep it one line
                raise ValueError(
                    f"MLflow parent run {parent_run_id!r} not found at {self.tracking_uri}: "
                    f"{str(exc).splitlines()[0]}"
                ) from None
        if experiment_id is None:
            exp = self.client.get_experiment_by_name(experiment)
            experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        all_tags = {"avts.kind": "eval", "avts.eval": job, "mlflow.runName": f"eval-{job}"}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        all_tags.update(tags or {})
        # The checkpoint's LoggedModel, which this run's metrics are linked to.
        self.model_id = ""
        if parent_run_id and checkpoint_step is not None:
            self.model_id = find_checkpoint_model(self.client, parent_run_id, checkpoint_step)
        if self.model_id:
            all_tags["avts.model_id"] = self.model_id
        self.run = self.client.create_run(experiment_id, tags=all_tags)
        self.run_id = self.run.info.run_id
        self.experiment_id = self.run.info.experiment_id
        self.parent_run_id = parent_run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step, model_id=self.model_id or None)
            for k, v in metrics.items()
            if v is not None and math.isfinite(float(v))
        ]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def log_artifacts(self, folder: str | Path) -> None:
        self.client.log_artifacts(self.run_id, str(folder))

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
