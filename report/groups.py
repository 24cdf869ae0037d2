"""Configurations: the compared runs grouped by every varying parameter except the seeds, each
with a short label and one colour for every table and figure of the report."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from report.plots import PALETTE

__all__ = ["ConfigGroup", "all_metrics", "group_runs"]

# Parameters that name a run rather than configure it, and so never split configurations.
RUN_SPECIFIC = ("run.dir", "run.name", "checkpoint.dir", "launch.folder", "eval.out_dir")
LABEL_CHARS = 40


def _is_seed(param: str) -> bool:
    return param.rsplit(".", 1)[-1].endswith("seed")


@dataclass
class ConfigGroup:
    """Runs that differ only in their seeds."""

    label: str
    params: dict[str, str]
    color: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    seeds: list[str] = field(default_factory=list)


def all_metrics(row: dict[str, Any]) -> dict[str, float]:
    """The run's metrics and its evaluations' (the latest run of each job wins)."""
    run = row["_run"]
    values = {} if run.data.tags.get("avts.kind") == "eval" else dict(run.data.metrics)
    for child in row["_children"]:
        values.update(child.data.metrics)
    return values


def group_runs(rows: list[dict[str, Any]]) -> tuple[list[ConfigGroup], list[str]]:
    """Configurations (in the order of their first run) and the seed parameters that vary."""
    params = [
        {} if r["_run"].data.tags.get("avts.kind") == "eval" else dict(r["_run"].data.params)
        for r in rows
    ]
    keys = {k for p in params for k in p}
    varying = sorted(
        k for k in keys if len({p.get(k) for p in params}) > 1 and not k.endswith(RUN_SPECIFIC)
    )
    seed_keys = [k for k in varying if _is_seed(k)]
    config_keys = [k for k in varying if not _is_seed(k)]
    groups: dict[tuple, ConfigGroup] = {}
    for row, p in zip(rows, params, strict=True):
        is_eval_only = not p
        key = ("eval", row["run"]) if is_eval_only else tuple(p.get(k) for k in config_keys)
        if key not in groups:
            shown = {k: p.get(k, "") for k in config_keys} if not is_eval_only else {}
            groups[key] = ConfigGroup("", shown, PALETTE[len(groups) % len(PALETTE)])
        groups[key].rows.append(row)
        seeds = list(dict.fromkeys(str(p.get(k)) for k in seed_keys))  # "0", not "0, 0"
        groups[key].seeds.append(", ".join(seeds))
    ordered = list(groups.values())
    for index, (group, labels) in enumerate(zip(ordered, _labels(ordered), strict=True)):
        group.label = labels or f"config {chr(ord('A') + index % 26)}"
    return ordered, seed_keys


_SEED_SUFFIX = re.compile(r"[-_.]*(s|seed)?\d*$")


def _labels(groups: list[ConfigGroup]) -> list[str]:
    """A short distinct label per configuration ("" where none is found; letters then).

    The label is repeated in every table header and figure legend, so: the common prefix of
    its runs' names without a seed suffix (``curriculum-s0, curriculum-s1`` -> ``curriculum``),
    else its parameters as ``key=value`` when short, else nothing.
    """
    if len(groups) == 1 and not groups[0].params:
        return ["all runs"]
    names = []
    for g in groups:
        prefix = os.path.commonprefix([r["run"] for r in g.rows])
        names.append(_SEED_SUFFIX.sub("", prefix) if len(g.rows) > 1 else g.rows[0]["run"])
    if all(names) and len(set(names)) == len(names):
        return names
    texts = [", ".join(f"{k}={v}" for k, v in g.params.items()) for g in groups]
    if all(0 < len(t) <= LABEL_CHARS for t in texts) and len(set(texts)) == len(texts):
        return texts
    return [""] * len(groups)
