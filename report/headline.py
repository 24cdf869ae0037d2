"""The few figures of an evaluation a person looks at first, with their 95% intervals, as
``avts eval`` prints them (the full metrics go to MLflow and ``metrics.json``)::

    avts eval sync: 41.2 s
      figure                            value    95% interval       over
      sync accuracy, easy negatives     0.8125   0.7397 - 0.8853    96 clips
      sync accuracy, hard negatives     0.6719   0.5891 - 0.7546    96 clips
    full metrics (37): MLflow run 1f2e... (http://mlflow:5000/#/experiments/1/runs/1f2e...),
    runs/quickstart/eval/sync/metrics.json

Intervals (:mod:`avts_dist.stats`): over splits or folds (Student's t, :func:`mean_ci`) where the
job has several; for sync accuracy, the binomial interval of its two proportions (normal
approximation, :func:`balanced_accuracy_interval`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from avts_dist.stats import Interval, balanced_accuracy_interval, mean_ci

__all__ = ["HeadlineRow", "format_headline", "headline_rows"]


@dataclass(frozen=True)
class HeadlineRow:
    label: str
    interval: Interval
    over: str = ""

    @property
    def value(self) -> float:
        return self.interval.mean

    @property
    def low(self) -> float | None:
        return self.interval.low

    @property
    def high(self) -> float | None:
        return self.interval.high


def _sync_rows(m: dict[str, float]) -> list[HeadlineRow]:
    """acc = (TPR + rejection rate) / 2, with the interval of the mean of two proportions."""
    rows = []
    tpr, num_clips = m.get("tpr"), m.get("num_clips")
    for kind in ("easy", "hard", "superhard"):
        if f"acc_{kind}" not in m:
            continue
        acc, reject, num_neg = m[f"acc_{kind}"], m[f"reject_{kind}"], m[f"num_{kind}"]
        if tpr is not None and num_clips and num_neg:
            ci = balanced_accuracy_interval(tpr, num_clips, reject, num_neg)
        else:
            ci = Interval(acc, None, None, int(num_neg), 0.95, "none")
        over = f"{int(num_clips or 0)} clips, {int(num_neg)} negatives"
        rows.append(HeadlineRow(f"sync accuracy, {kind} negatives", ci, over))
    if "offset_acc" in m:  # eval/sync_offsets.py; no interval: a clip's classes are not independent
        num = int(m["num_offset_clips"])
        over = f"{num} clips x {int(m['num_offset_classes'])} offsets"
        for label, key in (("top-1", "offset_acc"), ("within one", "offset_acc_within1")):
            ci = Interval(m[key], None, None, num, 0.95, "none")
            rows.append(HeadlineRow(f"offset class, {label}", ci, over))
    return rows


def _over(m: dict[str, float], pattern: str, label: str, unit: str) -> list[HeadlineRow]:
    """One row: the mean of the metrics named ``pattern`` (one per split/fold), with its
    t-interval."""
    values = [v for k, v in sorted(m.items()) if re.fullmatch(pattern, k) and math.isfinite(v)]
    if not values:
        return []
    ci = mean_ci(values)
    over = f"{ci.n} {unit}{'s' if ci.n != 1 else ''}"
    return [HeadlineRow(label, ci, over)]


def _finetune_rows(m: dict[str, float], prefix: str = "") -> list[HeadlineRow]:
    rows = []
    for variant in ("pretrained", "scratch"):
        rows += _over(
            m, rf"{prefix}{variant}/[^/]+/acc_video", f"video accuracy, {variant}", "split"
        )
    if len(rows) == 2:
        gains = {
            k: m[k] - m[k.replace("pretrained/", "scratch/")]
            for k in m
            if re.fullmatch(rf"{prefix}pretrained/[^/]+/acc_video", k)
            and k.replace("pretrained/", "scratch/") in m
        }
        rows += _over(gains, r".*", "gain over scratch", "split")
    return rows


def _probe_rows(m: dict[str, float], prefix: str = "") -> list[HeadlineRow]:
    label = "audio linear-probe accuracy" if prefix else "linear-probe accuracy"
    return _over(m, rf"{prefix}[^/]+/acc", label, "fold")


def _lowlabel_rows(m: dict[str, float]) -> list[HeadlineRow]:
    """One row per (label set, recipe, k, init): the mean over fine-tuning seeds f (metrics
    ``<label_set>/<recipe>/<init>/k<k>/f<f>/acc``), pretrained above scratch."""
    cell = re.compile(r"([^/]+)/([^/]+)/(pretrained|scratch)/k([^/]+)/f\d+/acc")
    found = {match.groups() for key in m if (match := cell.fullmatch(key))}
    cells = sorted(
        ((label_set, recipe, k, init) for label_set, recipe, init, k in found),
        key=lambda c: (c[0], c[1], int(c[2]) if c[2].isdigit() else 1 << 30, c[3] != "pretrained"),
    )
    rows = []
    for label_set, recipe, k, init in cells:
        pattern = rf"{label_set}/{recipe}/{init}/k{k}/f\d+/acc"
        rows += _over(m, pattern, f"{label_set} {recipe}, k={k}, {init}", "fine-tuning seed")
    return rows


def _multimodal_rows(m: dict[str, float]) -> list[HeadlineRow]:
    rows = []
    for part, label in (("fused", "late fusion"), ("video_only", "video"), ("audio_only", "audio")):
        rows += _over(m, rf"[^/]+/acc_{part}", f"accuracy, {label}", "split")
    return rows


def headline_rows(kind: str, metrics: dict[str, float]) -> list[HeadlineRow]:
    """The headline of an evaluation of ``kind`` (``eval.registry`` kinds) from its metrics."""
    if kind == "sync":
        return _sync_rows(metrics)
    if kind == "finetune":
        return _finetune_rows(metrics)
    if kind == "probe":
        return _probe_rows(metrics)
    if kind == "multimodal":
        return _multimodal_rows(metrics)
    if kind == "synthetic":
        return _finetune_rows(metrics, "video/") + _probe_rows(metrics, "audio/")
    if kind == "lowlabel":
        return _lowlabel_rows(metrics)
    return []


def format_headline(rows: list[HeadlineRow]) -> list[str]:
    table = [("figure", "value", "95% interval", "over")]
    for r in rows:
        interval = f"{r.low:.4f} - {r.high:.4f}" if r.low is not None else "-"
        table.append((r.label, f"{r.value:.4f}", interval, r.over))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in table]  # fmt: skip
