"""The report's three figures from the grouped runs and the metric histories fetched for them
(:func:`histories_needed` says which): training curves, sync accuracy against the audio offset,
downstream accuracy. Drawing is :mod:`report.plots`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from report.fetch import History
from report.groups import ConfigGroup, all_metrics
from report.plots import bar_figure, curves_figure, offset_figure

__all__ = [
    "BAR_METRICS",
    "Figure",
    "downstream",
    "histories_needed",
    "sync_vs_offset",
    "training_curves",
]

# Downstream bars: (metric, axis label); scratch baselines beside the pretrained figures.
BAR_METRICS = (
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
# Logged by `avts eval sync` with step = the offset in ms.
OFFSET_METRIC = "sync/acc_vs_offset"

Histories = dict[tuple[str, str], History]


@dataclass
class Figure:
    name: str  # file stem and comp.files key
    png: bytes
    alt: str
    caption: str


def histories_needed(rows: list[dict[str, Any]], curves: list[str]) -> list[tuple[str, str]]:
    """(run id, metric) of every history the figures draw: the curves each run logged, and the
    sync-against-offset points of each row's latest evaluation that logged them."""
    wanted = [
        (r["_run"].info.run_id, c) for r in rows for c in curves if c in r["_run"].data.metrics
    ]
    latest = (_latest_job(r, OFFSET_METRIC) for r in rows)
    return wanted + [(c.info.run_id, OFFSET_METRIC) for c in latest if c is not None]


def training_curves(
    groups: list[ConfigGroup], curves: list[str], colors, histories: Histories
) -> Figure | None:
    """Training curves of the pretraining runs (eval-only rows have none)."""
    logged = {k for g in groups for r in g.rows for k in r["_run"].data.metrics}
    drawn = [c for c in curves if c in logged]
    if not drawn:
        return None
    series = {
        g.label: {
            c: [histories[(r["_run"].info.run_id, c)] for r in g.rows
                if c in r["_run"].data.metrics]
            for c in drawn
        }
        for g in groups
    }  # fmt: skip
    return Figure(
        "training_curves",
        curves_figure(drawn, series, colors),
        "training curves",
        "Training curves: mean over seeds with its 95% band; each seed faint.",
    )


def sync_vs_offset(groups: list[ConfigGroup], colors, histories: Histories) -> Figure | None:
    series = {
        g.label: [
            [(step * 1e-3, value) for step, value in histories[(c.info.run_id, OFFSET_METRIC)]]
            for c in (_latest_job(r, OFFSET_METRIC) for r in g.rows)
            if c is not None
        ]
        for g in groups
    }
    if not any(series.values()):
        return None
    return Figure(
        "sync_vs_offset",
        offset_figure(series, colors),
        "sync accuracy against audio offset",
        "Sync accuracy against the audio offset: in-sync pairs against the same clip's audio "
        "shifted by each offset; mean over seeds with its 95% band.",
    )


def downstream(groups: list[ConfigGroup], colors) -> Figure | None:
    values = {g.label: [all_metrics(r) for r in g.rows] for g in groups}
    bars = [
        (m, name) for m, name in BAR_METRICS if any(m in v for vs in values.values() for v in vs)
    ]
    if not bars:
        return None
    per_metric = {
        label: {m: [v[m] for v in vs if m in v] for m, _ in bars} for label, vs in values.items()
    }
    return Figure(
        "downstream",
        bar_figure(bars, per_metric, colors),
        "downstream accuracy",
        "Downstream accuracy: bars are means over seeds, whiskers the 95% interval, dots the runs.",
    )


def _latest_job(row: dict[str, Any], metric: str):
    """The latest evaluation run of ``row`` that logged ``metric`` (children are by start)."""
    return next((c for c in reversed(row["_children"]) if metric in c.data.metrics), None)
