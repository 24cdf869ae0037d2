"""Side-by-side comparison of MLflow runs: pretraining runs as rows, their child evaluation runs'
metrics as columns (``<job>/<metric>``), plus the parameters that differ between the runs.

Everything is read through MLflow's search API (``MlflowClient.search_runs``,
``get_metric_history``), so a local store and a tracking server work alike.
Outputs: a terminal table, ``compare.csv``, ``compare.html`` (with the plots embedded) and PNGs:
``training_curves.png``, ``sync_vs_offset.png``, ``downstream.png``.
"""

from __future__ import annotations

import fnmatch
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Comparison", "compare_runs"]

DEFAULT_CURVES = ("loss", "train/loss", "val/sync_acc_easy", "val/sync_acc_hard")
# Headline downstream metrics, (column, bar label) pairs; scratch baselines next to pretrained.
BAR_METRICS = (
    ("sync/acc_easy", "sync (easy)"),
    ("sync/acc_hard", "sync (hard)"),
    ("ucf101/acc_video", "UCF101"),
    ("ucf101/scratch/acc_video_mean", "UCF101 scratch"),
    ("hmdb51/acc_video", "HMDB51"),
    ("hmdb51/scratch/acc_video_mean", "HMDB51 scratch"),
    ("esc50/acc", "ESC-50"),
    ("dcase2014/acc", "DCASE"),
    ("multimodal/acc", "multimodal"),
    ("synthetic/video/acc_video", "synthetic video"),
    ("synthetic/video/scratch/acc_video_mean", "synthetic video scratch"),
    ("synthetic/audio/acc", "synthetic audio"),
)
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
    from mlflow import MlflowClient

    from avts_dist.tracking.eval_runs import resolve_tracking_uri

    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    runs: dict[str, Any] = {}
    if run_ids:
        for rid in run_ids:
            try:
                run = client.get_run(rid)
            except Exception as exc:
                raise ValueError(
                    f"MLflow run {rid!r} not found: {str(exc).splitlines()[0]}"
                ) from None
            runs[rid] = run
            children = client.search_runs(
                [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{rid}'"
            )
            runs.update({c.info.run_id: c for c in children})
    else:
        name = experiment or "avts"
        exp = client.get_experiment_by_name(name)
        if exp is None:
            known = [e.name for e in client.search_experiments()]
            raise ValueError(f"MLflow experiment {name!r} not found (experiments: {known})")
        runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id], max_results=5000)}
    if not runs:
        raise ValueError("no runs to compare")

    def is_eval(r) -> bool:
        return r.data.tags.get("avts.kind") == "eval"

    parents = [r for r in runs.values() if not is_eval(r)]
    groups: dict[str, list[Any]] = {r.info.run_id: [] for r in parents}
    orphans = []
    for r in runs.values():
        if is_eval(r):
            pid = r.data.tags.get("mlflow.parentRunId", "")
            if pid in groups:
                groups[pid].append(r)
            else:
                orphans.append(r)
    # Eval runs whose parent is outside the selection get a row of their own.
    heads = sorted(parents, key=lambda r: r.info.start_time or 0) + orphans

    params = {r.info.run_id: r.data.params for r in parents}
    varying = sorted(
        k
        for k in {k for p in params.values() for k in p}
        if len({p.get(k) for p in params.values()}) > 1
        and not k.endswith(("run.dir", "checkpoint.dir", "run.name"))
    )[:max_params]

    rows: list[dict[str, Any]] = []
    metric_cols: list[str] = []
    for head in heads:
        row: dict[str, Any] = {
            "run": head.data.tags.get("mlflow.runName", head.info.run_id[:8]),
            "run_id": head.info.run_id[:8],
            "status": head.info.status,
        }
        for k in varying:
            row[k] = head.data.params.get(k)
        values: dict[str, float] = {}
        if not is_eval(head):
            values.update(head.data.metrics)
        children = sorted(
            groups.get(head.info.run_id, []) if not is_eval(head) else [head],
            key=lambda r: r.info.start_time or 0,
        )
        for child in children:  # the latest run of each job wins
            values.update(child.data.metrics)
        row["num_evals"] = len(children)
        for k, v in values.items():
            if (metrics and _matches(k, metrics)) or (not metrics and _headline(k)):
                row[k] = v
                if k not in metric_cols:
                    metric_cols.append(k)
        row["_run"] = head
        row["_children"] = children
        rows.append(row)
    columns = ["run", "run_id", "status", *varying, "num_evals", *sorted(metric_cols)]
    comp = Comparison(
        columns, rows, groups={pid: [c.info.run_id for c in cs] for pid, cs in groups.items()}
    )
    if out_dir is not None:
        _write_outputs(comp, client, Path(out_dir), list(curves or DEFAULT_CURVES))
    for row in rows:
        row.pop("_run")
        row.pop("_children")
    return comp


def _write_outputs(comp: Comparison, client, out: Path, curves: list[str]) -> None:
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    with (out / "compare.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*comp.columns, "run_id_full"])
        for r in comp.rows:
            w.writerow(
                [_fmt(r.get(c)) if r.get(c) is not None else "" for c in comp.columns]
                + [r["_run"].info.run_id]
            )
    comp.files["csv"] = str(out / "compare.csv")

    # Training curves of the pretraining runs (only metrics some run has: no empty panels).
    logged = {k for r in comp.rows for k in r["_run"].data.metrics}
    curves = [c for c in curves if c in logged] or curves[:1]
    fig, axes = plt.subplots(
        1, max(1, len(curves)), figsize=(4.2 * max(1, len(curves)), 3.2), squeeze=False
    )
    drawn = 0
    for ax, metric in zip(axes[0], curves, strict=False):
        for r in comp.rows:
            run = r["_run"]
            if run.data.tags.get("avts.kind") == "eval" or metric not in run.data.metrics:
                continue
            hist = sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.step)
            ax.plot([m.step for m in hist], [m.value for m in hist], label=r["run"])
            drawn += 1
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=100)
    plt.close(fig)
    comp.files["training_curves"] = str(out / "training_curves.png")

    # Sync accuracy against offset (metric history with step = offset in ms).
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in comp.rows:
        for child in r["_children"]:
            if "sync/acc_vs_offset" in child.data.metrics:
                hist = sorted(
                    client.get_metric_history(child.info.run_id, "sync/acc_vs_offset"),
                    key=lambda m: m.step,
                )
                ax.plot(
                    [m.step / 1000 for m in hist], [m.value for m in hist], "o-", label=r["run"]
                )
    ax.axhline(0.5, c="k", lw=0.5)
    ax.set_xlabel("audio offset (s)")
    ax.set_ylabel("balanced sync accuracy")
    ax.set_ylim(0, 1.02)
    if ax.lines[1:]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "sync_vs_offset.png", dpi=100)
    plt.close(fig)
    comp.files["sync_vs_offset"] = str(out / "sync_vs_offset.png")

    # Downstream accuracy bars, one group per benchmark, one bar per run.
    present = [
        (m, label)
        for m, label in BAR_METRICS
        if any(r.get(m) is not None or _child_metric(r, m) is not None for r in comp.rows)
    ]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(present) * max(1, len(comp.rows)) / 2), 3.8))
    n = max(1, len(comp.rows))
    width = 0.8 / n
    for i, r in enumerate(comp.rows):
        vals = [r.get(m) if r.get(m) is not None else _child_metric(r, m) for m, _ in present]
        xs = [j + i * width for j in range(len(present))]
        ax.bar(xs, [v if v is not None else 0 for v in vals], width, label=r["run"])
    ax.set_xticks(
        [j + 0.4 - width / 2 for j in range(len(present))],
        [label for _, label in present],
        rotation=30,
        ha="right",
        fontsize=8,
    )
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    if present:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "downstream.png", dpi=100)
    plt.close(fig)
    comp.files["downstream"] = str(out / "downstream.png")

    rows_html = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in comp.columns) + "</tr>"
        for r in comp.rows
    )
    children_html = "".join(
        f"<li><b>{html.escape(r['run'])}</b> ({r['_run'].info.run_id}): "
        + ", ".join(
            f"{html.escape(c.data.tags.get('avts.eval', '?'))} {c.info.run_id[:8]}"
            for c in r["_children"]
        )
        + "</li>"
        for r in comp.rows
    )
    imgs = "".join(
        f'<figure><img src="{Path(p).name}"><figcaption>{k}</figcaption></figure>'
        for k, p in comp.files.items()
        if p.endswith(".png")
    )
    (out / "compare.html").write_text(
        "<!doctype html><meta charset=utf-8><title>avts compare</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px}th{background:#eee}"
        "figure{display:inline-block;margin:8px}</style>"
        "<h1>avts compare</h1><table><tr>"
        + "".join(f"<th>{html.escape(c)}</th>" for c in comp.columns)
        + "</tr>"
        + rows_html
        + "</table><h2>Evaluation runs per pretraining run</h2><ul>"
        + children_html
        + "</ul>"
        + imgs
    )
    comp.files["html"] = str(out / "compare.html")


def _child_metric(row: dict[str, Any], metric: str) -> float | None:
    for child in reversed(row.get("_children", [])):
        if metric in child.data.metrics:
            return child.data.metrics[metric]
    return None
