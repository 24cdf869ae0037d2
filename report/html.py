"""The comparison report that ``avts compare --out DIR`` writes.

- ``compare.html``: one self-contained page (styles and figures inline, no network) that reads
  at 1280 px without sideways scrolling. Runs are grouped into configurations by every varying
  parameter except the seeds; each figure is the mean over a configuration's seeds with its 95%
  t-interval (``mean +- half width``, n runs), next to the table it explains (pretraining curves,
  sync accuracy against offset, downstream accuracy). A legend says what each metric means and
  which direction is better; runs link to the MLflow UI when the tracking URI is a server.
- ``compare.csv`` (one row per run), ``compare_groups.csv`` (configuration x metric: mean, CI
  half width, n) and the figures as PNG files.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import html
from pathlib import Path
from typing import Any

from avts_dist.stats import Interval, mean_ci
from report import figures
from report.fetch import History
from report.groups import ConfigGroup, group_runs
from report.metric_docs import UP, describe_metric

__all__ = ["mlflow_run_url", "write_report"]

# Configurations (value columns) per table: more are stacked as further tables, never scrolled.
MAX_COLUMNS = 4


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI when the tracking URI is a server, else None."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return None


# ---- formatting ---------------------------------------------------------------------------------


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _breakable(text: str) -> str:
    """Escaped text with break opportunities after / . _ = , (long names wrap at a boundary)."""
    out = _esc(text)
    for ch in ("/", ".", "_", "=", ","):
        out = out.replace(ch, ch + "<wbr>")
    return out


def _num(v: float) -> str:
    if v != 0 and abs(v) < 1e-3:
        return f"{v:.2e}"
    return f"{v:.1f}" if abs(v) >= 100 else f"{v:.3f}"


def _cell(ci: Interval | None, best: float | None) -> str:
    if ci is None:
        return '<td class="num muted">-</td>'
    value = f'<span class="v">{_num(ci.mean)}</span>'
    if ci.half_width is not None:
        value += f' <span class="ci">&plusmn;&nbsp;{_num(ci.half_width)}</span>'
    cls = "num best" if best is not None and ci.mean == best else "num"
    return f'<td class="{cls}">{value}<br><span class="n">n={ci.n}</span></td>'


def _arrow(direction: str) -> str:
    if not direction:
        return ""
    symbol = "&uarr;" if direction == UP else "&darr;"
    return f' <span class="dir" title="{direction} is better">{symbol}</span>'


def _swatch(group: ConfigGroup) -> str:
    return f'<span class="swatch" style="background:{group.color}"></span>'


def _chunks(groups: list[ConfigGroup]) -> list[list[ConfigGroup]]:
    return [groups[i : i + MAX_COLUMNS] for i in range(0, len(groups), MAX_COLUMNS)] or [[]]


def _header(first: str, groups: list[ConfigGroup]) -> str:
    cells = "".join(f"<th>{_swatch(g)}{_breakable(g.label)}</th>" for g in groups)
    return f'<tr><th class="name">{first}</th>{cells}</tr>'


def _interval(group: ConfigGroup, metric: str) -> Interval | None:
    values = [r[metric] for r in group.rows if r.get(metric) is not None]
    return mean_ci(values) if values else None


def _metric_tables(metrics: list[str], groups: list[ConfigGroup]) -> str:
    stats = {m: {g.label: _interval(g, m) for g in groups} for m in metrics}
    best: dict[str, float | None] = {}
    for metric in metrics:
        _, direction = describe_metric(metric)
        means = [ci.mean for ci in stats[metric].values() if ci is not None]
        pick = max if direction == UP else min
        best[metric] = pick(means) if direction and len(means) > 1 else None
    out = []
    for chunk in _chunks(groups):
        body = "".join(
            f'<tr><th class="name">{_breakable(m)}{_arrow(describe_metric(m)[1])}</th>'
            + "".join(_cell(stats[m][g.label], best[m]) for g in chunk)
            + "</tr>"
            for m in metrics
        )
        out.append(f"<table>{_header('metric', chunk)}{body}</table>")
    return "".join(out)


def _config_tables(groups: list[ConfigGroup], seed_keys: list[str], link) -> str:
    keys = list(dict.fromkeys(k for g in groups for k in g.params))
    out = []
    for chunk in _chunks(groups):
        rows = [
            f'<tr><th class="name">{_breakable(k)}</th>'
            + "".join(f"<td>{_breakable(g.params.get(k, ''))}</td>" for g in chunk)
            + "</tr>"
            for k in keys
        ]
        if seed_keys:
            rows.append(
                f'<tr><th class="name">{_breakable(", ".join(seed_keys))}</th>'
                + "".join(f"<td>{_esc('; '.join(g.seeds))}</td>" for g in chunk)
                + "</tr>"
            )
        rows.append(
            '<tr><th class="name">runs</th>'
            + "".join(
                "<td>" + ", ".join(link(r["_run"], r["run"]) for r in g.rows) + "</td>"
                for g in chunk
            )
            + "</tr>"
        )
        out.append(f"<table>{_header('parameter', chunk)}{''.join(rows)}</table>")
    return "".join(out)


def _runs_table(groups: list[ConfigGroup], seed_keys: list[str], link) -> str:
    seed_head = _breakable(", ".join(seed_keys)) if seed_keys else "seed"
    body = []
    for g in groups:
        for row, seed in zip(g.rows, g.seeds, strict=True):
            run = row["_run"]
            evals = ", ".join(
                link(c, c.data.tags.get("avts.eval", c.info.run_id[:8])) for c in row["_children"]
            )
            started = (
                dt.datetime.fromtimestamp(run.info.start_time / 1000).strftime("%Y-%m-%d %H:%M")
                if run.info.start_time
                else ""
            )
            body.append(
                f"<tr><td>{link(run, row['run'])}</td><td>{_swatch(g)}{_breakable(g.label)}</td>"
                f"<td>{_esc(seed)}</td><td>{_esc(run.info.status)}</td><td>{evals}</td>"
                f"<td>{started}</td></tr>"
            )
    head = (
        f"<tr><th>run</th><th>configuration</th><th>{seed_head}</th><th>status</th>"
        "<th>evaluations</th><th>started</th></tr>"
    )
    return f'<table class="runs">{head}{"".join(body)}</table>'


def _legend(metrics: list[str]) -> str:
    items = []
    for metric in metrics:
        meaning, direction = describe_metric(metric)
        better = f" <i>{direction.capitalize()} is better.</i>" if direction else ""
        items.append(
            f"<dt>{_breakable(metric)}{_arrow(direction)}</dt><dd>{_esc(meaning or '-')}"
            f"{better}</dd>"
        )
    return f'<dl class="legend">{"".join(items)}</dl>'


def _figure(png: bytes, alt: str, caption: str) -> str:
    data = base64.b64encode(png).decode()
    return (
        f'<figure><img alt="{_esc(alt)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


CSS = """
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;
color:#1f2328;background:#fff}
main{max-width:1240px;margin:0 auto;padding:16px 20px 40px}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:17px;margin:28px 0 10px;padding-bottom:4px;border-bottom:1px solid #d0d7de}
p{margin:4px 0 8px;max-width:100%;overflow-wrap:anywhere}
.meta{color:#57606a}
table{border-collapse:collapse;width:100%;table-layout:fixed;margin:0 0 12px;font-size:13px}
th,td{border:1px solid #d0d7de;padding:4px 6px;text-align:left;vertical-align:top;
overflow-wrap:anywhere;word-break:break-word}
th{background:#f6f8fa;font-weight:600}
th.name{width:34%}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:normal}
td.best .v{font-weight:700}
.ci,.n,.muted{color:#57606a;font-size:12px}
.dir{color:#57606a}
.pair{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.pair>.tables{flex:1 1 480px;min-width:0}
.pair>figure{flex:1 1 560px;min-width:0;max-width:100%;margin:0}
figure img{display:block;max-width:100%;height:auto;border:1px solid #eaeef2}
figcaption{color:#57606a;font-size:12px;margin-top:4px}
dl.legend{display:grid;grid-template-columns:minmax(0,16em) minmax(0,1fr);gap:3px 14px;margin:0}
dl.legend dt{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px;
overflow-wrap:anywhere}
dl.legend dd{margin:0}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:5px}
table.runs th:nth-child(1){width:20%} table.runs th:nth-child(2){width:22%}
table.runs th:nth-child(3){width:9%} table.runs th:nth-child(4){width:10%}
table.runs th:nth-child(6){width:13%}
a{color:#0969da;text-decoration:none} a:hover{text-decoration:underline}
code{font-size:12px;overflow-wrap:anywhere}
details summary{cursor:pointer;color:#57606a}
"""


def _section(title: str, intro: str, tables: str, figure: str) -> str:
    inner = (f'<div class="tables">{tables}</div>' if tables else "") + figure
    return f'<h2>{title}</h2><p class="meta">{intro}</p><div class="pair">{inner}</div>'


def _write_csvs(comp, groups: list[ConfigGroup], metrics: list[str], out: Path) -> None:
    with (out / "compare.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*comp.columns, "run_id_full"])
        for r in comp.rows:
            w.writerow(
                [_csv_value(r.get(c)) for c in comp.columns] + [r["_run"].info.run_id]
            )  # fmt: skip
    with (out / "compare_groups.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["configuration", "metric", "mean", "ci95_half_width", "n", "better"])
        for g in groups:
            for metric in metrics:
                vals = [r[metric] for r in g.rows if r.get(metric) is not None]
                if vals:
                    ci = mean_ci(vals)
                    half = "" if ci.half_width is None else f"{ci.half_width:.6g}"
                    w.writerow(
                        [g.label, metric, f"{ci.mean:.6g}", half, ci.n, describe_metric(metric)[1]]
                    )


def _csv_value(v: Any) -> str:
    return "" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)


def write_report(
    comp,
    histories: dict[tuple[str, str], History],
    out: Path,
    curves: list[str],
    *,
    tracking_uri: str = "",
    title: str = "",
) -> None:
    """Writes the report files into ``out`` and records them in ``comp.files``.

    ``comp.rows`` still carry ``_run`` (the MLflow run) and ``_children`` (its evaluation runs);
    ``histories`` are the metric histories :func:`report.figures.histories_needed` names.
    """
    out.mkdir(parents=True, exist_ok=True)
    groups, seed_keys = group_runs(comp.rows)
    colors = {g.label: g.color for g in groups}
    start = comp.columns.index("num_evals") + 1 if "num_evals" in comp.columns else 0
    metrics = comp.columns[start:]
    _write_csvs(comp, groups, metrics, out)
    comp.files["csv"] = str(out / "compare.csv")
    comp.files["groups_csv"] = str(out / "compare_groups.csv")

    def link(run, text: str) -> str:
        url = mlflow_run_url(tracking_uri, run.info.experiment_id, run.info.run_id)
        label = _breakable(text)
        return f'<a href="{_esc(url)}">{label}</a>' if url else label

    pre = [m for m in metrics if m == "loss" or m.startswith(("train/", "val/"))]
    sync = [m for m in metrics if m.startswith("sync/")]
    downstream = [m for m in metrics if m not in pre and m not in sync]
    sections = []
    for heading, intro, rows, figure in (
        (
            "Pretraining",
            "The pretraining runs' last logged values (avts train).",
            pre,
            figures.training_curves(groups, curves, colors, histories),
        ),
        (
            "Synchronisation",
            "Held-out clips of the pretraining corpus (avts eval sync).",
            sync,
            figures.sync_vs_offset(groups, colors, histories),
        ),
        (
            "Downstream",
            "Evaluation runs of each pretraining run (avts eval; the latest run of each job).",
            downstream,
            figures.downstream(groups, colors),
        ),
    ):
        img = ""
        if figure is not None:
            (out / f"{figure.name}.png").write_bytes(figure.png)
            comp.files[figure.name] = str(out / f"{figure.name}.png")
            img = _figure(figure.png, figure.alt, figure.caption)
        if rows or img:
            sections.append(
                _section(heading, intro, _metric_tables(rows, groups) if rows else "", img)
            )

    page = _page(title or "avts compare", groups, seed_keys, metrics, sections, link, tracking_uri)
    (out / "compare.html").write_text(page)
    comp.files["html"] = str(out / "compare.html")


def _page(title, groups, seed_keys, metrics, sections, link, tracking_uri: str) -> str:
    num_runs = sum(len(g.rows) for g in groups)
    store = _esc(tracking_uri or "(default)")
    if tracking_uri.startswith(("http://", "https://")):
        where = f'MLflow server <a href="{store}">{store}</a> (run names link to the MLflow UI)'
    else:
        where = f"MLflow store <code>{store}</code> (browse it with <code>mlflow ui " \
            f"--backend-store-uri {store}</code>)"  # fmt: skip
    seeds = (
        f"Runs that differ only in {_esc(', '.join(seed_keys))} form one configuration."
        if seed_keys
        else "No seed parameter varies: each configuration is one run unless repeated."
    )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{CSS}</style></head><body><main>"
        f"<h1>{_esc(title)}</h1>"
        f'<p class="meta">{num_runs} runs in {len(groups)} configuration(s) from {where}; '
        f"written {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}.</p>"
        "<h2>Reading this report</h2>"
        f"<p>{seeds} Each table cell and figure is the mean over a configuration's runs with "
        "its 95% t-interval (mean &plusmn; half width, n runs; no interval for n = 1); bold "
        "marks the best configuration of a row. &uarr; higher is better, &darr; lower is "
        "better.</p>"
        + _legend(metrics)
        + "<h2>Configurations</h2>"
        + '<p class="meta">The parameters that differ between configurations.</p>'
        + _config_tables(groups, seed_keys, link)
        + "".join(sections)
        + "<h2>Runs</h2>"
        + _runs_table(groups, seed_keys, link)
        + "</main></body></html>"
    )
