"""``avts compare --best METRIC``: the checkpoints ranked by an evaluation metric, through MLflow
3's LoggedModels.

Each saved checkpoint is a LoggedModel of its pretraining run (``TrainRun.log_checkpoint``)
whose weights stay in the checkpoint store (tag ``avts.checkpoint``); evaluation runs link
their metrics to it (``EvalRun``). :func:`best_checkpoints` asks MLflow's own search,
``search_logged_models`` ordered by the metric, better first (the direction from
:mod:`report.metric_docs`, or ``lower_is_better``).
"""

from __future__ import annotations

from dataclasses import dataclass

from report.fetch import client_for, experiment_by_name
from report.metric_docs import DOWN, describe_metric

__all__ = ["BestCheckpoint", "best_checkpoints", "format_best"]

_PAGE = 100


@dataclass(frozen=True)
class BestCheckpoint:
    model_id: str
    name: str
    value: float
    step: int | None
    checkpoint: str  # where the weights are (the checkpoint tag dir or URL)
    run_id: str  # the pretraining run
    eval_run_id: str  # the evaluation run that measured the value


def best_checkpoints(
    metric: str,
    *,
    tracking_uri: str = "",
    experiment: str | None = None,
    top: int = 5,
    lower_is_better: bool | None = None,
) -> list[BestCheckpoint]:
    """The ``top`` checkpoints of ``experiment`` (default ``avts``) with ``metric`` linked,
    best first. ValueError (one line) for an unknown experiment."""
    client = client_for(tracking_uri)
    exp = experiment_by_name(client, experiment or "avts")
    if lower_is_better is None:
        lower_is_better = describe_metric(metric)[1] == DOWN
    order = [{"field_name": f"metrics.{metric}", "ascending": lower_is_better}]
    out: list[BestCheckpoint] = []
    token = None
    while len(out) < top:
        page = client.search_logged_models(
            [exp.experiment_id], order_by=order, max_results=_PAGE, page_token=token
        )
        for model in page:
            # A model measured more than once: its newest value of the metric.
            linked = sorted((m for m in model.metrics or [] if m.key == metric),
                            key=lambda m: m.timestamp)  # fmt: skip
            if not linked:
                continue  # a checkpoint nobody has evaluated on this metric
            step = model.tags.get("avts.step")
            out.append(
                BestCheckpoint(
                    model.model_id,
                    model.name,
                    linked[-1].value,
                    int(step) if step is not None else None,
                    model.tags.get("avts.checkpoint", ""),
                    model.source_run_id or "",
                    linked[-1].run_id or "",
                )  # fmt: skip
            )
            if len(out) == top:
                break
        token = page.token
        if not token:
            break
    return out


def format_best(metric: str, best: list[BestCheckpoint], lower_is_better: bool) -> str:
    if not best:
        return f"no checkpoint has {metric} linked (run avts eval on a checkpoint of a tracked run)"
    head = f"checkpoints by {metric} ({'lower' if lower_is_better else 'higher'} is better):"
    rows = [("#", metric, "step", "model", "checkpoint")]
    for i, b in enumerate(best, 1):
        rows.append((str(i), f"{b.value:.4f}", str(b.step if b.step is not None else "-"),
                     f"{b.name} ({b.model_id})", b.checkpoint or "-"))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join([head, *lines])
