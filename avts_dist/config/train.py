"""The training run: ``run``, ``optim``, ``deepspeed``, ``checkpoint`` and ``train``."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from avts_dist.config.common import check_choices, fail

__all__ = ["CheckpointConfig", "DeepSpeedConfig", "OptimConfig", "RunConfig", "TrainConfig"]


@dataclass
class RunConfig:
    name: str = "avts"
    # Run directory; empty means runs/<run.name> (filled by load_config).
    dir: str = ""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", self.name):
            fail("run.name", f"{self.name!r} must be letters, digits, '_', '-' or '.'")


@dataclass
class OptimConfig:
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        check_choices(self, "optim")
        if self.lr <= 0:
            fail("optim.lr", "must be > 0")


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 0
    # bf16: torch.autocast (convolutions and matmuls in bf16; weights, gradients, their
    # all-reduce, the optimizer and BatchNorm in fp32). fp16 is not offered: it needs loss
    # scaling, and the GPUs this targets (Ampere and later) have bf16.
    precision: Literal["fp32", "bf16"] = "fp32"
    grad_accum_steps: int = 1
    # auto: "cpu:gloo,cuda:nccl" with CUDA (NCCL for GPU tensors, gloo for the CPU-side
    # collectives: object broadcasts, checkpoint manifests), gloo otherwise.
    backend: Literal["auto", "gloo", "nccl", "cpu:gloo,cuda:nccl"] = "auto"
    # Escape hatch: raw DeepSpeed JSON keys merged last over the generated config.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choices(self, "deepspeed")
        if self.grad_accum_steps < 1:
            fail("deepspeed.grad_accum_steps", "must be >= 1")


@dataclass
class CheckpointConfig:
    # Empty means <run.dir>/checkpoints (filled by load_config); may be an fsspec URL (s3://...).
    dir: str = ""
    every_steps: int = 0
    keep_last: int = 3
    storage_options: dict[str, Any] = field(default_factory=dict)
    # Local folder DeepSpeed writes into when checkpoint.dir is remote (then uploaded), and where
    # a remote checkpoint is fetched to resume. Empty: <run.dir>/checkpoint_staging. Environment
    # variables are expanded: $SLURM_TMPDIR/avts puts it on node-local disks (write $VAR, not
    # ${VAR}, which OmegaConf reads as an interpolation); every node then uploads its own ranks'
    # files and fetches its own copy to resume.
    staging_dir: str = ""
    # A remote checkpoint.dir only: the step blocks while DeepSpeed writes the staged copy, and a
    # background thread uploads it, verifies it and publishes it (docs/training.md). Off by
    # default: `latest` then lags a save by one upload, and the staged copy needs its disk until
    # the upload ends; at scale, where a save to S3 takes seconds per save, turn it on.
    async_upload: bool = False
    # A failed upload is retried this many times (waits 1, 2, 4 ... s, at most 30 s), then the
    # save is reported not published and training goes on.
    upload_retries: int = 5
    # Rank 0 publishes once every rank's upload is verified: it waits for them this long.
    upload_timeout_s: float = 1800.0
    # A preemption waits this long for an upload in flight (and for its own save's) before it
    # exits; keep it under the scheduler's warning time (e.g. SLURM's --signal lead time).
    preempt_wait_s: float = 60.0

    def __post_init__(self) -> None:
        if self.every_steps < 0:
            fail("checkpoint.every_steps", "must be >= 0 (0 = only at the end)")
        if self.keep_last < 1:
            fail("checkpoint.keep_last", "must be >= 1")
        if self.upload_retries < 0:
            fail("checkpoint.upload_retries", "must be >= 0")
        if self.upload_timeout_s <= 0:
            fail("checkpoint.upload_timeout_s", "must be > 0")
        if self.preempt_wait_s < 0:
            fail("checkpoint.preempt_wait_s", "must be >= 0")


@dataclass
class TrainConfig:
    # avts: audio-visual sync (the two-stream model, AVTS loss, curriculum). video_ssl: the
    # video-only baseline (CVRL): two windows of each video are the positive pair, InfoNCE over
    # the global batch; no audio is decoded and the curriculum is ignored (docs/loss-and-curriculum.md).
    objective: Literal["avts", "video_ssl"] = "avts"
    # Optimizer steps of the run; 0: as many as data.epochs gives.
    max_steps: int = 100
    log_every: int = 10
    val_every_steps: int = 0
    val_batches: int = 4
    # Consecutive non-finite steps that stop the run (latest stays the last good checkpoint).
    max_nonfinite_steps: int = 3
    # Deterministic algorithms (on CUDA: cuDNN deterministic, no benchmark autotuning, and
    # CUBLAS_WORKSPACE_CONFIG set); false lets cuDNN pick the fastest kernels.
    deterministic: bool = True
    # A progress bar on a terminal; elsewhere (logs, SLURM) one progress line every
    # progress_every_s seconds. false: neither.
    progress: bool = True
    progress_every_s: float = 30.0

    def __post_init__(self) -> None:
        check_choices(self, "train")
        if self.max_steps < 0:
            fail("train.max_steps", "must be >= 0 (0 = data.epochs decides)")
        if self.log_every < 1:
            fail("train.log_every", "must be >= 1")
        if self.progress_every_s <= 0:
            fail("train.progress_every_s", "must be > 0")
