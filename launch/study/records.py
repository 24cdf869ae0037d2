"""Reuse records: what produced a run dir's results (``study_record.json``), so that a re-run
reuses only results made with the same settings, and resumes only checkpoints made with them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from avts_dist.config import Config, flatten_config
from avts_dist.storage import atomic_write_text

__all__ = [
    "RECORD",
    "eval_finished",
    "eval_record",
    "pretrain_record",
    "read_record",
    "record_differences",
    "write_record",
]

RECORD = "study_record.json"
# Keys that do not change what a run computes: where it is logged, launched, resumed from.
_UNRECORDED = ("tracking.", "launch.", "run.", "resume", "train.progress")


def pretrain_record(cfg: Config) -> dict[str, Any]:
    """The resolved pretraining config, flattened, without the keys of ``_UNRECORDED``."""
    flat = flatten_config(cfg)
    return {k: v for k, v in flat.items() if not k.startswith(_UNRECORDED)}


def eval_record(job: str, overrides: list[str]) -> dict[str, Any]:
    """An evaluation's job and overrides, without the tracking ones."""
    return {"job": job, "overrides": [o for o in overrides if not o.startswith("tracking.")]}


def write_record(folder: Path, record: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / RECORD, json.dumps(record, indent=1, sort_keys=True))


def read_record(folder: Path) -> dict[str, Any] | None:
    """The record of ``folder``; None when there is none (results from before records)."""
    try:
        return json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None


def record_differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Keys whose values differ; a key only one side knows (a config key added or removed by a
    code change) is not a difference."""
    return sorted(k for k in saved.keys() & wanted.keys() if saved[k] != wanted[k])


def eval_finished(metrics_file: str | Path, job: str, overrides: list[str]) -> bool:
    """The evaluation's results exist and its record (if any: results from before records have
    none) says they were made with these overrides."""
    metrics_file = Path(metrics_file)
    if not metrics_file.exists():
        return False
    saved = read_record(metrics_file.parent.parent)  # <out_dir>/<job>/metrics.json
    return not saved or not record_differences(saved, eval_record(job, overrides))
