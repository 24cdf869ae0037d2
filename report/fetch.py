"""Every MLflow read of the reports, through MLflow's client API (``search_runs``,
``get_metric_history``), so that a local store and a tracking server work alike. Rendering
(:mod:`report.html`, :mod:`report.plots`, :mod:`report.study_tables`) gets what was read here
and never calls MLflow itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from avts_dist.tracking.eval_runs import resolve_tracking_uri

__all__ = [
    "History",
    "client_for",
    "experiment_by_name",
    "fetch_runs",
    "metric_histories",
    "study_runs",
]

# (step, value) points of one run's metric, by step.
History = list[tuple[float, float]]


def client_for(tracking_uri: str = ""):
    """An MlflowClient for ``tracking_uri`` (default: the project's ``./mlruns``)."""
    from mlflow import MlflowClient  # deferred: MLflow loads only when a report is made

    return MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))


def experiment_by_name(client, name: str):
    """The experiment; ValueError (one line, with the experiments there are) when unknown."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        known = [e.name for e in client.search_experiments()]
        raise ValueError(f"MLflow experiment {name!r} not found (experiments: {known})")
    return exp


def fetch_runs(client, experiment: str | None, run_ids: list[str] | None) -> dict[str, Any]:
    """Run id -> run: the runs ``run_ids`` and their child runs, or every run of
    ``experiment`` (default ``avts``). ValueError for an unknown run or experiment."""
    runs: dict[str, Any] = {}
    if not run_ids:
        exp = experiment_by_name(client, experiment or "avts")
        return {r.info.run_id: r for r in client.search_runs([exp.experiment_id], max_results=5000)}
    for rid in run_ids:
        try:
            run = client.get_run(rid)
        except Exception as exc:
            raise ValueError(f"MLflow run {rid!r} not found: {str(exc).splitlines()[0]}") from None
        runs[rid] = run
        children = client.search_runs(
            [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{rid}'"
        )
        runs.update({c.info.run_id: c for c in children})
    return runs


def metric_histories(client, wanted: Iterable[tuple[str, str]]) -> dict[tuple[str, str], History]:
    """(run id, metric) -> the metric's history by step, for each pair of ``wanted``."""
    out = {}
    for run_id, metric in dict.fromkeys(wanted):
        hist = sorted(client.get_metric_history(run_id, metric), key=lambda m: m.step)
        out[(run_id, metric)] = [(m.step, m.value) for m in hist]
    return out


def study_runs(client, study: str) -> list:
    """Every run tagged ``avts.study=study``, in any experiment, oldest first."""
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    runs, token = [], None
    while True:
        page = client.search_runs(
            experiment_ids,
            filter_string=f"tags.`avts.study` = '{study}'",
            max_results=1000,
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs
