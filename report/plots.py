"""The report's figures (matplotlib, Agg): training curves, sync accuracy against the audio
offset and downstream accuracy, each per configuration as the mean over its seeds with a 95%
interval band or error bar, and the individual seeds faint behind it.

Each function takes ``series``: configuration label -> list of per-run data, and the colour of
each configuration, so a configuration has one colour in every figure and in the tables.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from avts_dist.stats import mean_ci

__all__ = ["PALETTE", "bar_figure", "curves_figure", "offset_figure"]

# matplotlib's tab10, as hex for the HTML swatches.
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)  # fmt: skip
# Figures are drawn for half of a 1280 px page: 6.2 in at 100 dpi.
WIDTH_IN, DPI = 6.2, 100

History = Sequence[tuple[float, float]]  # (x, value) points of one run


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    _pyplot().close(fig)
    return buf.getvalue()


def _mean_band(ax, runs: list[History], color: str, label: str, marker: str = "") -> None:
    """Each run faint, then the mean at every x with a 95% t-interval band where n >= 2."""
    by_x: dict[float, list[float]] = {}
    for hist in runs:
        if len(runs) > 1:
            ax.plot([p[0] for p in hist], [p[1] for p in hist], color=color, alpha=0.25, lw=0.8)
        for x, v in hist:
            by_x.setdefault(x, []).append(v)
    xs = sorted(by_x)
    stats = [mean_ci(by_x[x]) for x in xs]
    n = max((s.n for s in stats), default=0)
    ax.plot(xs, [s.mean for s in stats], marker, color=color, lw=1.6, label=f"{label} (n={n})")
    banded = [(x, s) for x, s in zip(xs, stats, strict=True) if s.half_width is not None]
    if banded:
        ax.fill_between(
            [x for x, _ in banded],
            [s.low for _, s in banded],
            [s.high for _, s in banded],
            color=color,
            alpha=0.18,
            lw=0,
        )


def curves_figure(
    metrics: list[str], series: dict[str, dict[str, list[History]]], colors: dict[str, str]
) -> bytes:
    """One panel per metric; ``series[label][metric]`` holds each run's (step, value) history."""
    plt = _pyplot()
    cols = 1 if len(metrics) == 1 else 2
    rows = (len(metrics) + cols - 1) // cols
    fig, axes = plt.subplots(
        rows, cols, figsize=(WIDTH_IN, 2.6 * rows + 0.4), squeeze=False, layout="constrained"
    )
    for ax, metric in zip(axes.flat, metrics, strict=False):
        for label, per_metric in series.items():
            runs = [h for h in per_metric.get(metric, []) if h]
            if runs:
                _mean_band(ax, runs, colors[label], label)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", fontsize=7, ncols=2, frameon=False)
    return _png(fig)


def offset_figure(series: dict[str, list[History]], colors: dict[str, str]) -> bytes:
    """Balanced sync accuracy against the audio offset (s); 0.5 is chance."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 3.4), layout="constrained")
    for label, runs in series.items():
        if runs:
            _mean_band(ax, runs, colors[label], label, marker="o-")
    ax.axhline(0.5, color="k", lw=0.6, ls="--")
    ax.text(0.01, 0.51, "chance", fontsize=7, transform=ax.get_yaxis_transform())
    ax.set_xlabel("audio offset (s)", fontsize=8)
    ax.set_ylabel("balanced sync accuracy", fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if ax.lines[1:]:
        ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def bar_figure(
    bars: list[tuple[str, str]], values: dict[str, dict[str, list[float]]], colors: dict[str, str]
) -> bytes:
    """Grouped bars: one group per (metric, axis label) in ``bars``, one bar per configuration
    (``values[label][metric]`` = the runs' values): the mean, its 95% interval, the runs as dots."""
    plt = _pyplot()
    labels = list(values)
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 3.6), layout="constrained")
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        legend_label: str | None = label
        for j, (metric, _) in enumerate(bars):
            runs = values[label].get(metric) or []
            if not runs:
                continue
            ci = mean_ci(runs)
            x = j + (i - (len(labels) - 1) / 2) * width
            err = None if ci.half_width is None else [[ci.half_width], [ci.half_width]]
            ax.bar(
                x, ci.mean, width * 0.9, color=colors[label], alpha=0.85,
                yerr=err, capsize=3, error_kw={"lw": 1}, label=legend_label,
            )  # fmt: skip
            legend_label = None  # one legend entry per configuration
            ax.plot([x] * len(runs), runs, ".", color="k", ms=3, alpha=0.6)
    ax.set_xticks(range(len(bars)), [name for _, name in bars], rotation=25, ha="right")
    ax.tick_params(labelsize=7)
    ax.set_ylabel("accuracy", fontsize=8)
    # Headroom above 1.0 for the legend, so it never covers a bar.
    ax.set_ylim(0, 1.2)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.grid(axis="y", alpha=0.3)
    if ax.containers:
        ax.legend(fontsize=7, loc="upper center", ncols=min(4, len(labels)), frameon=False)
    return _png(fig)
