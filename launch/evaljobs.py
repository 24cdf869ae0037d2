"""The callables of export and evaluation jobs (what submitit pickles and runs in the job).

An evaluation job runs :func:`eval.run.evaluate` for one evaluation (one split, for job arrays)
and logs to MLflow as a child run of the pretraining run, whose id the job reads at run time from
``<run.dir>/mlflow_run_id`` (the pretraining job writes it; it does not exist at submit time).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval.registry import get_job

log = logging.getLogger("avts.launch")


def array_items(name: str, splits: list[int]) -> list[int | None]:
    """The split of each array task (one per split), or ``[None]`` for a single job."""
    return list(splits) if get_job(name).array_over_splits else [None]


def read_parent_run_id(run_dir: str) -> str | None:
    path = Path(run_dir) / "mlflow_run_id"
    return path.read_text().strip() if path.exists() else None


def _log_to_job_output() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")


@dataclass
class ExportJob:
    """Consolidated fp32 weights of the newest complete checkpoint, after pretraining."""

    checkpoint: str
    out: str

    def __call__(self) -> str:
        # Deferred to the job: torch and DeepSpeed are not needed to submit it.
        from avts_dist.export.consolidate import export_checkpoint

        _log_to_job_output()
        out, step = export_checkpoint(self.checkpoint, self.out)
        log.info("exported %s (step %d) to %s", self.checkpoint, step, out)
        return out


@dataclass
class EvalJob:
    """One evaluation of an exported model; ``overrides`` are config ``key=value`` items."""

    name: str
    checkpoint: str
    overrides: list[str] = field(default_factory=list)
    config: str = ""
    # Where the parent's MLflow run id is read at run time (<run.dir> of the pretraining run).
    parent_run_dir: str = ""
    parent_run_id: str = ""

    def parent(self) -> str:
        if self.parent_run_id:
            return self.parent_run_id
        return (read_parent_run_id(self.parent_run_dir) if self.parent_run_dir else None) or ""

    def __call__(self) -> dict[str, Any]:
        # Deferred to the job: the evaluation stack (torch, scikit-learn, MLflow) takes seconds
        # to import, and `avts launch` only pickles this object.
        from eval.run import evaluate

        _log_to_job_output()
        parent = self.parent()
        log.info("evaluation %s of %s (parent run %s)", self.name, self.checkpoint, parent or "-")
        result = evaluate(
            self.name,
            self.checkpoint,
            config=self.config or None,
            overrides=self.overrides,
            parent_run_id=parent,
        )
        log.info(
            "evaluation %s: MLflow run %s, artifacts in %s",
            self.name,
            result.run_id,
            result.out_dir,
        )
        return {"eval": self.name, "run_id": result.run_id, "parent_run_id": parent}


def eval_jobs_for(
    suite: list[str],
    checkpoint: str,
    *,
    splits: list[int],
    overrides: list[str],
    config: str = "",
    parent_run_dir: str = "",
    parent_run_id: str = "",
) -> dict[str, list[EvalJob]]:
    """name -> the callables of its job (several = one array task each)."""
    out: dict[str, list[EvalJob]] = {}
    for name in suite:
        out[name] = [
            EvalJob(
                name=name,
                checkpoint=checkpoint,
                overrides=[*overrides, *([f"eval.splits=[{split}]"] if split is not None else [])],
                config=config,
                parent_run_dir=parent_run_dir,
                parent_run_id=parent_run_id,
            )
            for split in array_items(name, splits)
        ]
    return out
