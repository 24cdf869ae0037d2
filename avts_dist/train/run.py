"""``run_training(cfg)``: one rank of a pretraining run, under any launcher or none.

The entry point is parse -> build -> train -> close, in ``try/finally``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from avts_dist.config import Config, ConfigError, load_config
from avts_dist.distributed import collectives as C
from avts_dist.distributed.host import log_cpus, raise_open_files_limit
from avts_dist.extras import require_tracking
from avts_dist.train.hooks import TrainHooks
from avts_dist.train.trainer import Trainer, TrainResult

__all__ = ["PREEMPT_SIGNALS", "resolve_config", "run_training"]

# SLURM sends SIGUSR2 (``--signal=USR2@grace``) or SIGTERM before it stops a job.
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


def resolve_config(cfg: Config | str | Path, overrides: list[str] | None = None) -> Config:
    if isinstance(cfg, (str, Path)):
        return load_config(cfg, overrides)
    if overrides:
        try:
            merged = OmegaConf.merge(OmegaConf.structured(cfg), OmegaConf.from_dotlist(overrides))
            cfg = OmegaConf.to_object(merged)
        except OmegaConfBaseException as exc:
            raise ConfigError(str(exc).split("\n")[0]) from None
    return cfg.fill_derived()


class _SignalBox:
    """Receives the preemption signal; the trainer reads it at the next step boundary."""

    def __init__(self) -> None:
        self.trainer: Trainer | None = None
        self.pending: int | None = None

    def __call__(self, signum, _frame) -> None:
        self.pending = signum
        if self.trainer is not None:
            self.trainer.stop_signal = signum


def imports_mlflow_here(env) -> bool:
    """Whether this rank imports mlflow (seconds and ~100 MB): only the ranks that track do, the
    first local rank of each node (rank 0 writes the run, each other node's first rank its
    system metrics: tracking/session.py). The process group does not exist yet: the launcher's
    ``LOCAL_RANK``, else SLURM's ``SLURM_LOCALID`` (a bare srun), else a single process. The other
    ranks check that mlflow is installed, so a missing one still stops every rank at start."""
    return (env.get("LOCAL_RANK") or env.get("SLURM_LOCALID") or "0") == "0"


def run_training(
    cfg: Config | str | Path,
    overrides: list[str] | None = None,
    *,
    hooks: TrainHooks | None = None,
) -> TrainResult:
    """Trains this rank to the end, a preemption signal or a failure (see :class:`TrainResult`).

    The process group comes from the launcher's environment (torchrun, deepspeed, srun,
    submitit, ``avts train --nproc``); without one it is a single process. ``hooks`` are the
    callbacks tests install (:class:`TrainHooks`); production passes none.
    """
    cfg = resolve_config(cfg, overrides)
    require_tracking(cfg, load=imports_mlflow_here(os.environ))
    raise_open_files_limit()  # before the process groups open their sockets
    ctx = C.init_distributed(cfg.deepspeed.backend)
    log_cpus(ctx.rank, cfg.data.num_workers)
    if ctx.rank != 0:
        logging.getLogger("avts").setLevel(logging.WARNING)
    # botocore says where it found credentials (INFO) each time an S3 client is made: once per
    # loader worker, checkpoint upload and fetch.
    for name in ("botocore.credentials", "aiobotocore.credentials"):
        logging.getLogger(name).setLevel(logging.WARNING)
    box = _SignalBox()
    previous: dict[int, Any] = {}
    for sig in PREEMPT_SIGNALS:
        # signal.signal raises ValueError outside the main thread: then no handler.
        with contextlib.suppress(ValueError):
            previous[sig] = signal.signal(sig, box)
    trainer = None
    try:
        trainer = Trainer(cfg, ctx, hooks)
        box.trainer = trainer
        if box.pending is not None:
            trainer.stop_signal = box.pending
        return trainer.train()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if trainer is not None:
            trainer.close()
