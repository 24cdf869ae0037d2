"""A study's tables T1-T5 (docs/results.md 1.7) from its MLflow runs: ``avts compare --study``.

Runs are found with MLflow's search API by the tag ``avts.study`` (:func:`report.fetch.study_runs`); ``avts.arm`` and
``avts.pretrain_seed`` (p) say where each belongs (set by ``avts study`` through
``tracking.tags``). A pretraining seed's value of a low-label cell is the mean test accuracy over
its fine-tuning seeds f; a cell reports the mean over p with the 95% t interval
(:func:`avts_dist.stats.t_interval`), and differences (gain over scratch, arm against arm) the
paired t interval over the p both sides have (:func:`avts_dist.stats.paired_t_interval`; scratch
seed r pairs with p = r). A cell nobody ran prints "not run"; nothing is filled in.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from avts_dist.stats import Interval, paired_t_interval, t_interval
from report.fetch import client_for, study_runs

__all__ = ["StudyCells", "StudyTables", "Table", "build_tables", "study_cells", "study_tables"]

ARMS = ("avts", "avts_no_curriculum", "avts_superhard", "early_fusion", "video_ssl")
SHOTS = ("1", "2", "4", "8", "all")
RECIPES = ("finetune", "probe")
SYNC_KINDS = ("easy", "hard", "superhard")
# Offset classification (eval/sync_offsets.py): sync/offset_acc, sync/offset_acc_within1.
OFFSET_METRICS = ("offset_acc", "offset_acc_within1")
_SYNC_NAMES = {*(f"sync/acc_{k}" for k in SYNC_KINDS), *(f"sync/{m}" for m in OFFSET_METRICS)}
NOT_RUN = "not run"
# Where scratch cells are looked for first: a run of their own, else the avts arm's job.
SCRATCH_SOURCES = ("scratch", "avts")
_CELL = re.compile(
    r"^lowlabel/(?P<label_set>[^/]+)/(?P<recipe>[^/]+)/(?P<init>[^/]+)/k(?P<k>[^/]+)/f(?P<f>\d+)/acc$"
)

PerSeed = dict[int, float]  # p -> value


@dataclass
class StudyCells:
    """What a study's runs measured: low-label cells and sync accuracies, by (arm, p)."""

    study: str
    # (arm, p, label_set, recipe, init, k) -> f -> accuracy
    lowlabel: dict[tuple, dict[int, float]] = field(default_factory=dict)
    # (arm, p) -> sync metric (acc_easy, ...) -> value
    sync: dict[tuple[str, int], dict[str, float]] = field(default_factory=dict)
    num_runs: int = 0
    skipped: list[str] = field(default_factory=list)  # runs without arm / seed tags

    def cell(self, arm: str, label_set: str, recipe: str, init: str, k: str) -> PerSeed:
        """p -> mean over f of one cell; scratch cells come from any arm (same init seed r)."""
        sources = [arm]
        if init == "scratch":
            sources = [*SCRATCH_SOURCES, *sorted({key[0] for key in self.lowlabel})]
        out: PerSeed = {}
        for source in sources:
            for (a, p, ls, rc, it, kk), by_f in self.lowlabel.items():
                if (a, ls, rc, it, kk) == (source, label_set, recipe, init, k) and p not in out:
                    out[p] = float(np.mean(list(by_f.values())))
        return dict(sorted(out.items()))

    def sync_acc(self, arm: str, kind: str) -> PerSeed:
        name = f"sync/{kind}" if kind in OFFSET_METRICS else f"sync/acc_{kind}"
        return {p: m[name] for (a, p), m in sorted(self.sync.items()) if a == arm and name in m}


def study_cells(runs: list, study: str) -> StudyCells:
    """The cells of a study's runs (:func:`report.fetch.study_runs`); a later run's value of
    the same cell wins."""
    cells = StudyCells(study)
    runs = sorted(runs, key=lambda r: r.info.start_time or 0)
    cells.num_runs = len(runs)
    for run in runs:
        tags = run.data.tags
        arm, seed = tags.get("avts.arm"), tags.get("avts.pretrain_seed", "")
        if not arm or not seed.lstrip("-").isdigit():
            cells.skipped.append(run.info.run_id)
            continue
        p = int(seed)
        for name, value in run.data.metrics.items():
            m = _CELL.match(name)
            if m:
                key = (arm, p, m["label_set"], m["recipe"], m["init"], m["k"])
                cells.lowlabel.setdefault(key, {})[int(m["f"])] = float(value)
            elif name in _SYNC_NAMES:
                cells.sync.setdefault((arm, p), {})[name] = float(value)
    return cells


# ---------------------------------------------------------------------------------------------
# Tables


Cell = Interval | str  # an interval, or "not run" / a row label


def _interval(values: PerSeed) -> Cell:
    return t_interval(list(values.values())) if values else NOT_RUN


def _paired(a: PerSeed, b: PerSeed) -> Cell:
    """``a - b`` over the seeds both have."""
    common = sorted(set(a) & set(b))
    if not common:
        return NOT_RUN
    return paired_t_interval([a[p] for p in common], [b[p] for p in common])


def _fmt(cell: Cell, signed: bool = False) -> str:
    if isinstance(cell, str):
        return cell
    mean = f"{cell.mean:+.3f}" if signed else f"{cell.mean:.3f}"
    if cell.n < 2:
        return f"{mean} (n=1)"
    return f"{mean} ± {cell.half_width:.3f} (n={cell.n})"


def _json(cell: Cell) -> Any:
    if isinstance(cell, str):
        return cell
    return cell.as_dict()  # no interval (n = 1): low, high and half_width are null


@dataclass
class Table:
    name: str
    title: str
    columns: list[str]
    rows: list[list[Cell]]
    signed: set[int] = field(default_factory=set)  # columns holding differences
    note: str = ""

    def markdown(self) -> str:
        lines = [f"### {self.name}: {self.title}", ""]
        if self.note:
            lines += [self.note, ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "---|" * len(self.columns))
        for row in self.rows:
            difference_row = isinstance(row[0], str) and " − " in row[0]
            cells = [
                _fmt(c, i in self.signed or (difference_row and i > 0)) for i, c in enumerate(row)
            ]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "columns": self.columns,
            "rows": [[_json(c) for c in row] for row in self.rows],
        }


def _lowlabel_rows(
    cells: StudyCells, label_set: str, arms: list[str], with_scratch: bool
) -> list[list[Cell]]:
    """recipe | k | arm... | (scratch) | differences: arm - scratch, or arm - arms[0]."""
    rows = []
    for recipe in RECIPES:
        for k in SHOTS:
            per = [cells.cell(arm, label_set, recipe, "pretrained", k) for arm in arms]
            row: list[Cell] = [recipe, k, *(_interval(v) for v in per)]
            if with_scratch:
                scratch = cells.cell(arms[0], label_set, recipe, "scratch", k)
                row += [_interval(scratch), _paired(per[0], scratch)]
            row += [_paired(v, per[0]) for v in per[1:]]
            rows.append(row)
    return rows


def _sync_rows(
    cells: StudyCells, arms: list[str], kinds: tuple[str, ...] = SYNC_KINDS
) -> list[list[Cell]]:
    rows: list[list[Cell]] = []
    for arm in arms:
        rows.append([arm, *(_interval(cells.sync_acc(arm, kind)) for kind in kinds)])
    for arm in arms[1:]:
        rows.append(
            [
                f"{arm} − {arms[0]}",
                *(_paired(cells.sync_acc(arm, k), cells.sync_acc(arms[0], k)) for k in kinds),
            ]
        )
    return rows


def build_tables(cells: StudyCells) -> list[Table]:
    sync_cols = ["arm", "sync easy", "sync hard", "sync super-hard"]
    curriculum = ["avts", "avts_no_curriculum", "avts_superhard"]
    tables = [
        _against_scratch(cells, "T1", "rhythm, AVTS against scratch", "rhythm"),
        Table(
            "T2",
            "rhythm, curriculum arms (pretrained) and paired differences to avts",
            ["recipe", "k", *curriculum, "no_curriculum − avts", "superhard − avts"],
            _lowlabel_rows(cells, "rhythm", curriculum, with_scratch=False),
            signed={5, 6},
        ),
        Table(
            "T2 sync",
            "sync accuracy on val (avts eval sync) of the curriculum arms",
            sync_cols,
            _sync_rows(cells, curriculum),
            signed=set(),
        ),
        Table(
            "T3",
            "two streams against early fusion",
            ["part", "avts (two-stream)", "early_fusion", "early_fusion − avts"],
            _t3_rows(cells),
            signed={3},
            note=(
                "Rhythm labels. Multimodal: early fusion's `FusedClassifier`, two-stream's "
                "video and audio nets with a head on their concatenated features, both "
                "fine-tuned. Video-only rows compare two-stream's video net with early fusion's "
                "`video` weights alone in a plain video net, and with the whole early-fusion net "
                "fed silence (`silent_audio`)."
            ),
        ),
        Table(
            "T4",
            "rhythm, audio-visual (avts) against video-only (video_ssl) self-supervision",
            ["recipe", "k", "avts", "video_ssl", "video_ssl − avts"],
            _lowlabel_rows(cells, "rhythm", ["avts", "video_ssl"], with_scratch=False),
            signed={4},
        ),
        _against_scratch(
            cells, "T5", "the control: appearance, AVTS against scratch", "appearance"
        ),
        Table(
            "T6",
            "offset classification on val (avts eval sync, zero-shot; chance 1/21 on ±1.0 s)",
            ["arm", "top-1", "within one class"],
            _sync_rows(cells, [*curriculum, "early_fusion"], OFFSET_METRICS),
            signed=set(),
        ),
    ]
    return tables


def _against_scratch(cells: StudyCells, name: str, title: str, label_set: str) -> Table:
    return Table(
        name,
        f"{title} (test accuracy, mean ± 95% CI over p)",
        ["recipe", "k", "avts", "scratch", "gain (avts − scratch)"],
        _lowlabel_rows(cells, label_set, ["avts"], with_scratch=True),
        signed={4},
    )


def _t3_rows(cells: StudyCells) -> list[list[Cell]]:
    """Sync; the multimodal task (k = 4, all); video-only use at k = all: two-stream's video net
    against early fusion's video weights alone and against early fusion fed silence."""
    rows: list[list[Cell]] = []

    def row(label: str, a: PerSeed, b: PerSeed) -> None:
        rows.append([label, _interval(a), _interval(b), _paired(b, a)])

    for kind in SYNC_KINDS:
        row(f"sync {kind}", cells.sync_acc("avts", kind), cells.sync_acc("early_fusion", kind))
    for k in ("4", "all"):
        row(
            f"multimodal fine-tune, k={k}",
            cells.cell("avts", "rhythm", "multimodal", "pretrained", k),
            cells.cell("early_fusion", "rhythm", "multimodal", "pretrained", k),
        )
    two_stream_video = cells.cell("avts", "rhythm", "finetune", "pretrained", "all")
    for recipe, label in (("finetune", "video weights alone"), ("silent_audio", "fed silence")):
        row(
            f"video-only fine-tune, k=all: early fusion {label}",
            two_stream_video,
            cells.cell("early_fusion", "rhythm", recipe, "pretrained", "all"),
        )
    row(
        "video-only probe, k=all",
        cells.cell("avts", "rhythm", "probe", "pretrained", "all"),
        cells.cell("early_fusion", "rhythm", "probe", "pretrained", "all"),
    )
    return rows


# ---------------------------------------------------------------------------------------------
# Outputs


@dataclass
class StudyTables:
    cells: StudyCells
    tables: list[Table]
    files: dict[str, str] = field(default_factory=dict)

    def markdown(self, command: str) -> str:
        head = [
            f"## Study `{self.cells.study}`",
            "",
            f"From `{command}` ({self.cells.num_runs} MLflow runs). Each cell: mean over "
            "pretraining seeds p of the mean over fine-tuning seeds f, ± the 95% t half-width; "
            "differences are paired over p.",
        ]
        if self.cells.skipped:
            head.append(
                f"\n{len(self.cells.skipped)} run(s) without avts.arm / avts.pretrain_seed tags "
                "were left out."
            )
        return "\n\n".join(["\n".join(head), *(t.markdown() for t in self.tables)]) + "\n"


def plot_accuracy_vs_k(cells: StudyCells, path: Path, label_set: str = "rhythm") -> bool:
    """Accuracy against labelled clips per class (log2), pretrained and scratch, one panel per
    arm and recipe with data, the 95% interval shaded. False when nothing was run."""
    from matplotlib.figure import Figure

    panels = [
        (arm, recipe)
        for arm in ARMS
        for recipe in RECIPES
        if any(cells.cell(arm, label_set, recipe, "pretrained", k) for k in SHOTS)
    ]
    if not panels:
        return False
    xs = [1, 2, 4, 8, 16]  # "all" drawn one octave after 8
    fig = Figure(figsize=(3.2 * len(RECIPES), 2.6 * -(-len(panels) // len(RECIPES))))
    axes = fig.subplots(-(-len(panels) // len(RECIPES)), len(RECIPES), squeeze=False).ravel()
    for ax, (arm, recipe) in zip(axes, panels, strict=False):
        for init, colour in (("pretrained", "tab:blue"), ("scratch", "tab:grey")):
            pts = []
            for x, k in zip(xs, SHOTS, strict=True):
                v = cells.cell(arm, label_set, recipe, init, k)
                if v:
                    ci = t_interval(list(v.values()))
                    pts.append((x, ci.mean, ci.low, ci.high))
            if not pts:
                continue
            x, mean, low, high = (np.array(c, dtype=float) for c in zip(*pts, strict=True))
            ax.plot(x, mean, "o-", color=colour, label=init)
            ok = ~np.isnan(low)
            ax.fill_between(x[ok], low[ok], high[ok], color=colour, alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [*SHOTS[:-1], "all"])
        ax.set_ylim(0, 1)
        ax.set_title(f"{arm}, {recipe}", fontsize=9)
        ax.set_xlabel("labelled clips per class")
        ax.set_ylabel(f"{label_set} test accuracy")
        ax.legend(fontsize=7)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def study_tables(
    study: str, *, tracking_uri: str = "", out_dir: str | Path | None = None
) -> StudyTables:
    """T1-T5 of ``study``; with ``out_dir``: results.md, results.json and accuracy_vs_k.png."""
    client = client_for(tracking_uri)
    cells = study_cells(study_runs(client, study), study)
    if not cells.num_runs:
        raise ValueError(f"no MLflow runs tagged avts.study={study!r} in {client.tracking_uri}")
    result = StudyTables(cells, build_tables(cells))
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        command = f"avts compare --study {study}"
        (out / "results.md").write_text(result.markdown(command))
        per_seed: dict[str, Any] = defaultdict(dict)
        for (arm, p, ls, recipe, init, k), by_f in sorted(cells.lowlabel.items()):
            per_seed[f"{arm}/{ls}/{recipe}/{init}/k{k}"][str(p)] = by_f
        (out / "results.json").write_text(
            json.dumps(
                {
                    "study": study,
                    "command": command,
                    "num_runs": cells.num_runs,
                    "skipped_runs": cells.skipped,
                    "tables": {t.name: t.as_json() for t in result.tables},
                    "lowlabel_per_seed": per_seed,
                    "sync_per_seed": {f"{a}/p{p}": m for (a, p), m in sorted(cells.sync.items())},
                },
                indent=1,
            )
        )
        result.files = {
            "results.md": str(out / "results.md"),
            "results.json": str(out / "results.json"),
        }
        if plot_accuracy_vs_k(cells, out / "accuracy_vs_k.png"):
            result.files["plot"] = str(out / "accuracy_vs_k.png")
    return result
