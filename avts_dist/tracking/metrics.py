"""Per-step training metrics: ``metrics.jsonl`` in the run dir, mirrored to an MLflow run.

One strict-JSON line per optimizer step (``avts status`` and ``avts compare`` read it)::

    {"step": 12, "epoch": 0, "loss": 0.81, "lr": 0.003, "samples_seen": 192,
     "total_steps": 300, "time": 1764620000.5, ...}

``loss`` is the global-batch mean (``null`` for a skipped step, never NaN); ``time`` is the wall
time (Unix seconds) the step ended; ``total_steps`` the run's length. Log steps add the loss
terms (``train/...``), the step timing (``train/step_s``, ``data/wait_fraction``) and every
numeric figure of the loader's telemetry summed over ranks under ``data/`` (``data/retries``,
``data/clips_per_s``, ``data/skipped_total``; its per-reason counts as ``data/skipped/<reason>``);
validation steps add ``val/...``; a curriculum stage change adds ``curriculum`` (the events) and
``curriculum/stage_index``; a skipped step adds ``skipped_step`` and ``num_skipped_steps``.

Records are buffered with their loss still on the device; :meth:`MetricsLogger.flush` (collective)
averages the buffered losses over ranks with one all-reduce and reads them with one host sync,
then rank 0 writes the lines and hands them to the tracker (a background writer: never waits).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from avts_dist.distributed import collectives as C
from avts_dist.tracking.mlflow_run import NoTracking

__all__ = ["MetricsLogger", "StepRecord", "StepTimer", "telemetry_fields"]

# Keys of a line that are not metrics (not sent to MLflow).
_NOT_METRICS = ("step", "curriculum", "skipped_step", "time", "total_steps")
# Loader telemetry that is a position, not a figure (the line has step and epoch already).
_NOT_TELEMETRY = ("global_step", "epoch")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def telemetry_fields(telemetry: dict[str, Any]) -> dict[str, float]:
    """Every numeric figure of ``loader.telemetry()`` as ``data/<key>``; a mapping of counts
    (``skipped``, ``filtered``: by reason) as ``data/<key>/<reason>``. Whatever keys the loader
    has (retry counters included) are logged, without a list here to keep up to date."""
    out: dict[str, float] = {}
    for key, value in telemetry.items():
        if key in _NOT_TELEMETRY:
            continue
        if isinstance(value, dict):
            out.update({f"data/{key}/{k}": v for k, v in value.items() if _is_number(v)})
        elif _is_number(value):
            out[f"data/{key}"] = value
    return out


def sum_over_ranks(fields: dict[str, float], world_size: int) -> dict[str, float]:
    """Per-rank counters summed over ranks (collective when ``world_size > 1``)."""
    if world_size == 1:
        return fields
    total: Counter = Counter()
    for rank_fields in C.all_gather_object(fields):
        total.update(rank_fields)
    return dict(total)


@dataclass
class StepRecord:
    step: int
    epoch: int
    lr: float
    samples_seen: int
    # This rank's loss, still on the device; None for a skipped step.
    loss: torch.Tensor | None
    # train/*, data/*, val/*, curriculum events, skip counts: merged into the line as they are.
    extra: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)


class StepTimer:
    """Host wall time of the steps since the last log step: waiting for data, and the rest."""

    def __init__(self) -> None:
        self.wait_s = self.compute_s = 0.0
        self.num_steps = 0

    def add(self, wait_s: float, compute_s: float) -> None:
        self.wait_s += wait_s
        self.compute_s += compute_s
        self.num_steps += 1

    def take(self, telemetry: dict[str, float]) -> dict[str, float]:
        """The log step's ``data/*`` (``telemetry``: :func:`telemetry_fields`, summed over ranks)
        and ``train/step_s`` fields; starts a new window."""
        total = self.wait_s + self.compute_s
        fields = {
            **telemetry,
            "data/wait_fraction": self.wait_s / total if total > 0 else 0.0,
            "train/step_s": total / max(1, self.num_steps),
        }
        self.__init__()
        return fields


def _strict(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsLogger:
    """Buffers :class:`StepRecord` s; every rank records and flushes, rank 0 writes."""

    def __init__(
        self,
        path: str | Path,
        *,
        device: torch.device,
        world_size: int,
        is_main: bool,
        total_steps: int = 0,
        tracker=None,
    ) -> None:
        self.path = Path(path)
        self.device = device
        self.world_size = world_size
        self.is_main = is_main
        self.total_steps = total_steps
        # Anything with log_metrics(metrics, step): an MLflow TrainRun, NoTracking.
        self.tracker = tracker or NoTracking()
        self.last_loss: float | None = None
        # The newest value of each field of the lines written (for the progress line).
        self.latest: dict[str, Any] = {}
        self._pending: list[StepRecord] = []

    def truncate_after(self, step: int) -> None:
        """Drops the lines of steps after ``step`` (written before a kill, replayed on resume)."""
        if not self.is_main or not self.path.exists():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def record(self, rec: StepRecord) -> None:
        self._pending.append(rec)

    def flush(self) -> list[dict[str, Any]]:
        """Writes every buffered record (collective); returns the lines."""
        if not self._pending:
            return []
        pending, self._pending = self._pending, []
        nan = torch.full((), math.nan, device=self.device)
        local = torch.stack(
            [(r.loss if r.loss is not None else nan).detach().float() for r in pending]
        )
        losses = (C.all_reduce_sum(local) / self.world_size).tolist()
        lines = []
        for rec, loss in zip(pending, losses, strict=True):
            line = {
                "step": rec.step,
                "epoch": rec.epoch,
                # null, not NaN, for a skipped step: the file stays strict JSON.
                "loss": loss if rec.loss is not None and math.isfinite(loss) else None,
                "lr": rec.lr,
                "samples_seen": rec.samples_seen,
                "total_steps": self.total_steps,
                "time": round(rec.time, 3),
                **{k: _strict(v) for k, v in rec.extra.items()},
            }
            lines.append(line)
        finite = [line["loss"] for line in lines if line["loss"] is not None]
        if finite:
            self.last_loss = finite[-1]
        for line in lines:
            self.latest.update(line)
        if self.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                for line in lines:
                    f.write(json.dumps(line, allow_nan=False) + "\n")
            for line in lines:
                metrics = {
                    k: v
                    for k, v in line.items()
                    if k not in _NOT_METRICS and isinstance(v, (int, float))
                }
                self.tracker.log_metrics(metrics, step=line["step"])
        return lines
