"""The trainer's resumable state: the client state of every checkpoint (format versioned).

Each part under a fixed key: ``trainer`` (step, epoch, skipped-step counts, the last validation
metrics), ``curriculum``, ``loader`` (global: identical on every rank and valid at any world
size), ``rng`` (rank 0; every rank also writes its own ``rng_rank_*.pt``), ``mlflow_run_id``,
``config`` (the resolved config, redacted) and ``world_size``. Model, optimizer and LR scheduler
go through DeepSpeed's sharded checkpoint (``train/checkpoint.py``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from avts_dist.config import redacted_config_dict
from avts_dist.train.checkpoint import CHECKPOINT_FORMAT_VERSION, get_rng_state, set_rng_state

if TYPE_CHECKING:
    from avts_dist.train.trainer import Trainer

__all__ = ["checkpoint_meta", "client_state", "restore_client_state"]


def client_state(t: Trainer) -> dict[str, Any]:
    """What ``t`` saves beside DeepSpeed's files."""
    return {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "trainer": {
            "step": t.step,
            "epoch": t.loader.epoch,
            "num_skipped_steps": t.num_skipped_steps,
            "num_nonfinite_in_row": t.num_nonfinite_in_row,
            "samples_seen": t.step * t.cfg.data.global_batch_size,
            "val_metrics": dict(t.val_metrics),
        },
        "curriculum": t.curriculum.state_dict(),
        "loader": t.loader.state_dict(),
        "rng": get_rng_state(),
        # Rank 0's tracker knows the id once the server has created the run (maybe late).
        "mlflow_run_id": t.tracker.run_id or t.mlflow_run_id,
        # Redacted: checkpoints are copied and uploaded; credentials come from the user again.
        "config": redacted_config_dict(t.cfg),
        "world_size": t.world_size,
    }


def checkpoint_meta(t: Trainer) -> dict[str, Any]:
    """What a checkpoint's ``COMPLETE`` marker records beside its manifest, read without opening
    a file (the ZeRO stage of a resume at another world size, the objective check of a resume)."""
    return {
        "zero_stage": t.cfg.deepspeed.zero_stage,
        "global_batch_size": t.cfg.data.global_batch_size,
        "mlflow_run_id": t.mlflow_run_id,
        "epoch": t.loader.epoch,
        "objective": t.cfg.train.objective,
    }


def restore_client_state(t: Trainer, state: dict[str, Any], rng_file: Path | None = None) -> None:
    """Puts ``state`` (from :func:`client_state`) back into ``t``; ``rng_file``: this rank's RNG
    file, used when the world size is the one the state was saved at."""
    version = state.get("format_version")
    if version != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(
            f"checkpoint format_version {version!r}; this code reads {CHECKPOINT_FORMAT_VERSION}"
        )
    saved_model = state.get("config", {}).get("model")
    if saved_model is not None and saved_model != dataclasses.asdict(t.cfg.model):
        raise ValueError("the checkpoint's model config differs from this run's model.* keys")
    trainer = state["trainer"]
    t.step = int(trainer["step"])
    t.num_skipped_steps = int(trainer["num_skipped_steps"])
    t.num_nonfinite_in_row = int(trainer["num_nonfinite_in_row"])
    t.val_metrics = dict(trainer.get("val_metrics", {}))
    t.curriculum.load_state_dict(state["curriculum"])
    t.loader.load_state_dict(state["loader"])
    t.mlflow_run_id = state.get("mlflow_run_id") or ""
    same_world = state.get("world_size") == t.world_size
    if same_world and rng_file is not None and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        # A new world size has no per-rank RNG to continue: derive it from the step.
        torch.manual_seed(t.cfg.data.seed + 1_000_003 * t.step + t.rank)
