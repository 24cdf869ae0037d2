"""Evaluation jobs on SLURM: export, then one job (or job array over splits) per evaluation.

Each evaluation runs ``avts eval <name> --checkpoint <model.pt> [k=v ...]`` inside the job and
logs to MLflow as a child run of the pretraining run, whose id the job reads at run time from
``<run.dir>/mlflow_run_id`` (the pretraining job writes it; it does not exist at submit time).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("avts.launch")

KNOWN_EVALS = ("sync", "ucf101", "hmdb51", "esc50", "dcase2014", "multimodal")
# Evaluations whose splits are independent fine-tuning runs: one array task per split.
ARRAY_OVER_SPLITS = ("ucf101", "hmdb51", "multimodal")


def parse_suite(text: str | list[str]) -> list[str]:
    names = text if isinstance(text, list) else [s.strip() for s in text.split(",")]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in KNOWN_EVALS]
    if unknown:
        from launch.executors import LaunchError

        raise LaunchError(
            f"--suite: unknown evaluation(s) {unknown}; known: {', '.join(KNOWN_EVALS)}"
        )
    if not names:
        from launch.executors import LaunchError

        raise LaunchError("--suite: no evaluation named")
    return names


def array_items(name: str, splits: list[int]) -> list[int | None]:
    return list(splits) if name in ARRAY_OVER_SPLITS else [None]


def read_parent_run_id(run_dir: str) -> str | None:
    path = Path(run_dir) / "mlflow_run_id"
    return path.read_text().strip() if path.exists() else None


def _cli(argv: list[str]) -> None:
    from avts_dist.cli import main

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    log.info("avts %s", " ".join(argv))
    status = main(argv)
    if status != 0:
        raise RuntimeError(f"`avts {' '.join(argv)}` exited with status {status}")


@dataclass
class ExportJob:
    """``avts export --checkpoint <dir> --out <file>`` after pretraining."""

    checkpoint: str
    out: str

    def __call__(self) -> str:
        _cli(["export", "--checkpoint", self.checkpoint, "--out", self.out])
        return self.out


@dataclass
class EvalJob:
    """``avts eval <name> --checkpoint <model.pt> [--parent-run-id ID] [k=v ...]``."""

    name: str
    checkpoint: str
    overrides: list[str] = field(default_factory=list)
    config: str = ""
    # Where the parent's MLflow run id is read at run time (<run.dir> of the pretraining run).
    parent_run_dir: str = ""
    parent_run_id: str = ""

    def argv(self, parent: str | None) -> list[str]:
        argv = ["eval", self.name, "--checkpoint", self.checkpoint]
        if self.config:
            argv += ["--config", self.config]
        if parent:
            argv += ["--parent-run-id", parent]
        return argv + list(self.overrides)

    def __call__(self) -> Any:
        parent = self.parent_run_id or (
            read_parent_run_id(self.parent_run_dir) if self.parent_run_dir else None
        )
        if parent:
            # Also for code paths that read it from the environment (mlflow child runs).
            os.environ["AVTS_MLFLOW_PARENT_RUN_ID"] = parent
        _cli(self.argv(parent))
        return {"eval": self.name, "parent_run_id": parent}


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
        jobs = []
        for split in array_items(name, splits):
            extra = [f"eval.splits=[{split}]"] if split is not None else []
            jobs.append(
                EvalJob(
                    name=name,
                    checkpoint=checkpoint,
                    overrides=[*overrides, *extra],
                    config=config,
                    parent_run_dir=parent_run_dir,
                    parent_run_id=parent_run_id,
                )
            )
        out[name] = jobs
    return out
