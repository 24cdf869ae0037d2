"""Side-by-side comparison of MLflow runs: pretraining runs as rows, their child evaluation runs'
metrics as columns (``<job>/<metric>``), plus the parameters that differ between the runs.

Everything is read through :mod:`report.fetch` (MLflow's search API), so a local store and a
tracking server work alike; the report is rendered from what was read.
Outputs: a terminal table and, with ``out_dir``, the report of ``report/html.py``
(``compare.html``, ``compare.csv``, ``compare_groups.csv`` and the PNG figures).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from report.fetch import client_for, fetch_runs, metric_histories
from report.figures import histories_needed
from report.html import write_report

__all__ = ["Comparison", "compare_runs"]

DEFAULT_CURVES = ("loss", "train/loss", "val/sync_acc_easy", "val/sync_acc_hard")
_DETAIL = re.compile(
    r"(^|/)(main/|split\d|fold\d+|num_|offset_|reject_|pair_acc_offset|threshold|tpr)"
)


@dataclass
class Comparison:
    columns: list[str]
    rows: list[dict[str, Any]]
    files: dict[str, str] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)  # parent id -> child ids

    def table(self) -> str:
        """Runs side by side: one column per run, one line per parameter/metric."""
        header = ["", *(str(r.get("run")) for r in self.rows)]
        lines = [[c, *(_fmt(r.get(c)) for r in self.rows)] for c in self.columns[1:]]
        grid = [header, *lines]
        widths = [max(len(row[i]) for row in grid) for i in range(len(header))]
        out = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in grid]
        out.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(out)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
    return str(v)


HEADLINE = (
    "loss",
    "train/loss",
    "val/sync_acc_*",
    "*/acc",
    "*/acc_video",
    "*/gain_over_scratch",
    "*/scratch/acc_video_mean",
    "sync/acc_hard",
    "sync/acc_superhard",
)


def _headline(name: str) -> bool:
    return not _DETAIL.search(name) and _matches(name, list(HEADLINE))


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def compare_runs(
    *,
    tracking_uri: str = "",
    experiment: str | None = None,
    run_ids: list[str] | None = None,
    metrics: list[str] | None = None,
    curves: list[str] | None = None,
    out_dir: str | Path | None = None,
    max_params: int = 8,
) -> Comparison:
    client = client_for(tracking_uri)
    runs = fetch_runs(client, experiment, run_ids)
    if not runs:
        raise ValueError("no runs to compare")
    parents = [r for r in runs.values() if not _is_eval(r)]
    groups, orphans = _children_of(parents, runs.values())
    # Eval runs whose parent is outside the selection get a row of their own.
    heads = sorted(parents, key=lambda r: r.info.start_time or 0) + orphans
    varying = _varying_params(parents, max_params)
    rows = [_row(head, groups, varying) for head in heads]
    metric_cols: list[str] = []
    for row in rows:
        for k, v in row.pop("_values").items():
            if (metrics and _matches(k, metrics)) or (not metrics and _headline(k)):
                row[k] = v
                if k not in metric_cols:
                    metric_cols.append(k)
    columns = ["run", "run_id", "status", *varying, "num_evals", *sorted(metric_cols)]
    comp = Comparison(
        columns, rows, groups={pid: [c.info.run_id for c in cs] for pid, cs in groups.items()}
    )
    if out_dir is not None:
        title = "avts compare: " + ("selected runs" if run_ids else experiment or "avts")
        curves = list(curves or DEFAULT_CURVES)
        histories = metric_histories(client, histories_needed(rows, curves))
        write_report(
            comp, histories, Path(out_dir), curves, tracking_uri=client.tracking_uri, title=title
        )
    for row in rows:
        row.pop("_run")
        row.pop("_children")
    return comp


def _is_eval(run) -> bool:
    return run.data.tags.get("avts.kind") == "eval"


def _children_of(parents: list, runs) -> tuple[dict[str, list], list]:
    """Parent id -> its evaluation runs, and the evaluation runs whose parent is not here."""
    groups: dict[str, list[Any]] = {r.info.run_id: [] for r in parents}
    orphans = []
    for r in runs:
        if _is_eval(r):
            pid = r.data.tags.get("mlflow.parentRunId", "")
            if pid in groups:
                groups[pid].append(r)
            else:
                orphans.append(r)
    return groups, orphans


def _varying_params(parents: list, max_params: int) -> list[str]:
    params = [r.data.params for r in parents]
    return sorted(
        k
        for k in {k for p in params for k in p}
        if len({p.get(k) for p in params}) > 1
        and not k.endswith(("run.dir", "checkpoint.dir", "run.name"))
    )[:max_params]


def _row(head, groups: dict[str, list], varying: list[str]) -> dict[str, Any]:
    """A run's row: name, parameters that vary, and (under ``_values``) its metrics and its
    evaluations' (the latest run of each job wins)."""
    row: dict[str, Any] = {
        "run": head.data.tags.get("mlflow.runName", head.info.run_id[:8]),
        "run_id": head.info.run_id[:8],
        "status": head.info.status,
    }
    for k in varying:
        row[k] = head.data.params.get(k)
    values: dict[str, float] = {} if _is_eval(head) else dict(head.data.metrics)
    children = sorted(
        groups.get(head.info.run_id, []) if not _is_eval(head) else [head],
        key=lambda r: r.info.start_time or 0,
    )
    for child in children:
        values.update(child.data.metrics)
    row["num_evals"] = len(children)
    row["_values"] = values
    row["_run"] = head
    row["_children"] = children
    return row
