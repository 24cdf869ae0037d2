"""The typed config tree: one dataclass per component.

Layers merge in order, strictly (lingua ``args.py``, torchtitan ``Trainer.Config``):

1. the dataclass defaults below;
2. a YAML file under ``configs/`` (it may name ``base: other.yaml`` or ``includes: [...]``,
   resolved relative to the file, merged before the file itself);
3. ``key=value`` dot-list overrides from the command line.

An unknown key, a value of the wrong type or an impossible combination raises
:class:`ConfigError` whose message names the full key (``data.fps``).
Each component receives only its own sub-config: ``build_loader(cfg.data, rank=..., ...)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = [
    "MISSING",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "CurriculumConfig",
    "CurriculumStage",
    "DataConfig",
    "DeepSpeedConfig",
    "EvalConfig",
    "FinetuneConfig",
    "LaunchConfig",
    "LinearProbeConfig",
    "LossConfig",
    "LowLabelConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "SyncEvalConfig",
    "TrackingConfig",
    "TrainConfig",
    "config_secrets",
    "config_to_dict",
    "deep_merge",
    "flatten_config",
    "load_config",
    "redacted_config_dict",
    "restore_secrets",
    "save_config",
    "secrets_in_environment",
]

NEGATIVE_KINDS = ("easy", "hard", "superhard")
REPO_ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("avts.config")


class ConfigError(ValueError):
    """A config problem, with the full key it concerns in the message."""


def _fail(key: str, msg: str) -> None:
    raise ConfigError(f"config key '{key}': {msg}")


@functools.cache
def _literal_fields(cls: type) -> dict[str, tuple]:
    hints = get_type_hints(cls)
    return {n: get_args(h) for n, h in hints.items() if get_origin(h) is Literal}


def _check_choices(obj: Any, section: str) -> None:
    """Literal-typed fields hold one of their values. OmegaConf checks them when it merges a
    layer; this covers a dataclass built directly in code."""
    for name, choices in _literal_fields(type(obj)).items():
        if getattr(obj, name) not in choices:
            _fail(
                f"{section}.{name}", f"must be one of {list(choices)}, got {getattr(obj, name)!r}"
            )


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``; nested mappings merge key by key."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _check_mix(key: str, mix: dict[str, float]) -> None:
    unknown = set(mix) - set(NEGATIVE_KINDS)
    if unknown:
        _fail(key, f"unknown negative kind(s) {sorted(unknown)}; expected {list(NEGATIVE_KINDS)}")
    if any(v < 0 for v in mix.values()):
        _fail(key, "negative-mix weights must be >= 0")
    if sum(mix.values()) <= 0:
        _fail(key, "negative-mix weights must not all be zero")


# The video decoders data.video_decoder names (avts_dist/data/frames.py).
VIDEO_DECODERS = ("torchcodec", "pyav", "decord")


@dataclass
class RunConfig:
    name: str = "avts"
    # Run directory; empty means runs/<run.name> (filled by load_config).
    dir: str = ""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", self.name):
            _fail("run.name", f"{self.name!r} must be letters, digits, '_', '-' or '.'")


@dataclass
class DataConfig:
    url: str = "data/synth"
    split: str = "train"
    val_split: str = "val"
    # fsspec options for the dataset's filesystem (merged over the environment's defaults).
    storage_options: dict[str, Any] = field(default_factory=dict)
    global_batch_size: int = 8
    seed: int = 0
    num_workers: int = 1
    # Clip reads in flight per worker (bounded concurrency, prefetched).
    prefetch: int = 8
    num_frames: int = 8
    fps: float = 8.0
    size: int = 32
    sample_rate: int = 16000
    num_mel_bins: int = 40
    mel_win_ms: float = 25.0
    mel_hop_ms: float = 10.0
    # Super-hard negatives are offset by at least this many seconds (and less than a clip).
    min_shift: float = 0.25
    # Initial mix of the extra negative's kind; empty means {"easy": 1.0}. The default must be
    # empty: OmegaConf merges a YAML mapping into a default one ({hard: 1} would gain easy: 1).
    negative_mix: dict[str, float] = field(default_factory=dict)
    # The run's one epoch knob: passes over the split; 0 means an endless stream (the run is
    # then as long as train.max_steps). With both set, the run stops at whichever comes first.
    epochs: int = 0
    drop_last: bool = True
    max_retries: int = 4
    retry_backoff_s: float = 0.1
    # torchcodec | pyav | decord: the video decoder; the default is the fastest that gives the
    # right frames, measured side by side (docs/benchmarks.md). All three agree on the frames.
    video_decoder: str = "torchcodec"
    # How training reads clips (docs/data-loading.md): "random" = one ranged read per clip, a
    # full shuffle; "block" = contiguous runs of a shard (block_mb each) served from a per-rank
    # cache, a two-level shuffle (blocks permuted, samples shuffled within windows of
    # shuffle_window_blocks blocks of a stream); "auto" = block for remote URLs (s3://, gs://,
    # ...), random for local paths. Evaluation always reads clip by clip.
    access: str = "auto"
    block_mb: float = 32.0
    # A gap between wanted clips (other splits) up to this is read through rather than paying a
    # new request: first-byte latency x stream bandwidth (20 ms x 100 MB/s; docs/data-loading.md).
    block_read_through_mb: float = 2.0
    shuffle_window_blocks: int = 2
    # Parallel streams of blocks in the global order (each rank reads only its streams' blocks);
    # 0 = the largest divisor of global_batch_size <= 256. Part of the order: fixed for a run.
    block_streams: int = 0
    # Where the block cache lives; empty = /dev/shm when it has room, else the temp directory.
    block_cache_dir: str = ""
    # A shard listed in the index but absent stops the build unless this is true (then its
    # clips are left out, with a warning giving the share of data lost).
    allow_missing_shards: bool = False
    # Training stops (SkippedClipsError) when more than this share of the clips tried failed.
    max_skip_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.video_decoder not in VIDEO_DECODERS:
            _fail("data.video_decoder", f"{self.video_decoder!r} is not one of {VIDEO_DECODERS}")
        for name in ("global_batch_size", "num_frames", "size", "sample_rate", "num_mel_bins"):
            if getattr(self, name) <= 0:
                _fail(f"data.{name}", f"must be > 0, got {getattr(self, name)}")
        if self.num_workers < 0:
            _fail("data.num_workers", "must be >= 0")
        if self.fps <= 0:
            _fail("data.fps", f"must be > 0, got {self.fps}")
        if self.epochs < 0:
            _fail("data.epochs", "must be >= 0 (0 = infinite)")
        clip_s = self.num_frames / self.fps
        if not 0 < self.min_shift < clip_s:
            _fail(
                "data.min_shift",
                f"must be in (0, clip length {clip_s:.3f}s = num_frames/fps), got {self.min_shift}",
            )
        if self.negative_mix:
            _check_mix("data.negative_mix", dict(self.negative_mix))
        if self.access not in ("auto", "random", "block"):
            _fail("data.access", f"must be auto, random or block, got {self.access!r}")
        if not self.block_mb > 0:
            _fail("data.block_mb", f"must be > 0 (MB), got {self.block_mb}")
        if self.block_read_through_mb < 0:
            _fail("data.block_read_through_mb", f"must be >= 0, got {self.block_read_through_mb}")
        if self.shuffle_window_blocks < 1:
            _fail("data.shuffle_window_blocks", f"must be >= 1, got {self.shuffle_window_blocks}")
        if self.block_streams < 0 or (
            self.block_streams and self.global_batch_size % self.block_streams
        ):
            _fail(
                "data.block_streams",
                f"must be 0 (auto) or divide data.global_batch_size "
                f"({self.global_batch_size}), got {self.block_streams}",
            )
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            _fail("data.max_skip_fraction", f"must be in [0, 1], got {self.max_skip_fraction}")

    @property
    def initial_negative_mix(self) -> dict[str, float]:
        return dict(self.negative_mix) or {"easy": 1.0}

    @property
    def clip_seconds(self) -> float:
        return self.num_frames / self.fps


@dataclass
class ModelConfig:
    # two_stream (AVTS: separate video and audio nets, usable alone) | early_fusion (one
    # audio-visual net: audio joins the video stream after video stage `fusion_stage`).
    arch: Literal["two_stream", "early_fusion"] = "two_stream"
    # torchvision-compatible video nets; widths/depths shrink them for CPU.
    video_arch: Literal["r2plus1d_18", "mc3_18", "r3d_18"] = "r2plus1d_18"
    video_width: int = 64
    video_layers: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    # vgg: AVTS-like, full size; tiny: for CPU tests.
    audio_arch: Literal["vgg", "tiny"] = "vgg"
    audio_width: int = 64
    embed_dim: int = 128
    # Hidden width of the embedding / fusion MLPs; 0 means the input width.
    head_hidden_dim: int = 0
    # Time bins the embedding heads see: 1 pools each stream globally (AVTS); N > 1 pools the
    # last stage over space (video) or frequency (audio) only, then over time into N bins, so the
    # embedding keeps *when* events happen inside a clip (what hard negatives test).
    temporal_bins: int = 1
    fusion_head: bool = False
    # early_fusion: the video stage (1-3) after which audio features are added; the audio net
    # runs as many stages first, the video net's later stages are shared.
    fusion_stage: int = 1
    activation_checkpointing: bool = False
    channels_last_3d: bool = False
    # A torchvision-layout video state dict (local path or fsspec URL) the video net starts from,
    # e.g. torchvision's Kinetics-400 weights saved with torch.save; "" starts from scratch.
    init_from: str = ""

    def __post_init__(self) -> None:
        _check_choices(self, "model")
        if self.fusion_stage not in (1, 2, 3):
            _fail("model.fusion_stage", f"must be 1, 2 or 3, got {self.fusion_stage}")
        if self.arch == "early_fusion" and self.init_from:
            _fail(
                "model.init_from", "torchvision weights fit model.arch=two_stream's video net only"
            )
        if len(self.video_layers) != 4 or any(n < 1 for n in self.video_layers):
            _fail("model.video_layers", "must be four stage depths, each >= 1")
        for name in ("video_width", "audio_width", "embed_dim"):
            if getattr(self, name) <= 0:
                _fail(f"model.{name}", "must be > 0")
        if self.head_hidden_dim < 0:
            _fail("model.head_hidden_dim", "must be >= 0 (0 = input width)")
        if self.temporal_bins < 1:
            _fail("model.temporal_bins", "must be >= 1 (1 = global pooling)")


@dataclass
class LossConfig:
    # contrastive: the AVTS margin loss.
    kind: Literal["contrastive", "infonce"] = "contrastive"
    margin: float = 0.99
    normalize: bool = True
    temperature: float = 0.07
    # Easy negatives from the global batch.
    negatives: Literal["all", "random_k", "hardest_k"] = "all"
    num_negatives: int = 1
    # With deepspeed.grad_accum_steps > 1: global = the negatives of the whole batch (embedding
    # cache, train/accumulation.py); micro = each micro-batch's own (a different objective).
    negatives_scope: Literal["global", "micro"] = "global"
    # Weight of each negative kind, and of positives against negatives.
    weights: dict[str, float] = field(
        default_factory=lambda: {"easy": 1.0, "hard": 1.0, "superhard": 1.0}
    )
    pos_weight: float = 1.0
    gather_with_grad: bool = True
    # Both directions: video anchors vs all audio and audio anchors vs all video.
    symmetric: bool = True
    # Seed of the random_k negative draw (with the step: identical at any world size).
    seed: int = 0
    # Weight of the fusion head's sync BCE term (used only when the model returns sync logits).
    head_weight: float = 1.0
    # train.objective=video_ssl: InfoNCE temperature of the two-view loss (CVRL uses 0.1).
    video_ssl_temperature: float = 0.1

    def __post_init__(self) -> None:
        _check_choices(self, "loss")
        if self.negatives != "all" and self.num_negatives < 1:
            _fail("loss.num_negatives", "must be >= 1 with random_k or hardest_k")
        if self.margin <= 0:
            _fail("loss.margin", "must be > 0")
        if self.temperature <= 0:
            _fail("loss.temperature", "must be > 0")
        if self.video_ssl_temperature <= 0:
            _fail("loss.video_ssl_temperature", "must be > 0")
        unknown = set(self.weights) - set(NEGATIVE_KINDS)
        if unknown:
            _fail("loss.weights", f"unknown negative kind(s) {sorted(unknown)}")


@dataclass
class CurriculumStage:
    name: str = "easy"
    # Empty means {"easy": 1.0}. The default must be empty: OmegaConf merges a YAML mapping
    # into the default one, so {hard: 1.0} would otherwise become {easy: 1.0, hard: 1.0}.
    negative_mix: dict[str, float] = field(default_factory=dict)
    # Loss weights per negative kind for this stage (merged over loss.weights).
    loss_weights: dict[str, float] = field(default_factory=dict)
    # The stage ends at the first trigger that fires; none set means it is the last stage.
    until_epoch: int | None = None
    until_step: int | None = None
    # Plateau trigger on a validation metric (e.g. val/sync_acc_easy).
    plateau_metric: str | None = None
    plateau_patience: int = 3
    plateau_min_delta: float = 0.001
    # max: the metric should rise (accuracy); min: it should fall (a loss).
    plateau_mode: Literal["max", "min"] = "max"


@dataclass
class CurriculumConfig:
    enabled: bool = True
    stages: list[CurriculumStage] = field(default_factory=lambda: [CurriculumStage()])

    def __post_init__(self) -> None:
        if not self.stages:
            _fail("curriculum.stages", "needs at least one stage")
        for i, stage in enumerate(self.stages):
            _check_choices(stage, f"curriculum.stages.{i}")
            if not stage.negative_mix:
                stage.negative_mix = {"easy": 1.0}
            _check_mix(f"curriculum.stages.{i}.negative_mix", dict(stage.negative_mix))
            if stage.plateau_patience < 1:
                _fail(f"curriculum.stages.{i}.plateau_patience", "must be >= 1")
            unknown = set(stage.loss_weights) - set(NEGATIVE_KINDS)
            if unknown:
                _fail(f"curriculum.stages.{i}.loss_weights", f"unknown kind(s) {sorted(unknown)}")
            last = i == len(self.stages) - 1
            has_trigger = (
                stage.until_epoch is not None
                or stage.until_step is not None
                or stage.plateau_metric is not None
            )
            if not last and not has_trigger:
                _fail(
                    f"curriculum.stages.{i}",
                    "every stage but the last needs until_epoch, until_step or plateau_metric",
                )


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
        _check_choices(self, "optim")
        if self.lr <= 0:
            _fail("optim.lr", "must be > 0")


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
        _check_choices(self, "deepspeed")
        if self.grad_accum_steps < 1:
            _fail("deepspeed.grad_accum_steps", "must be >= 1")


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

    def __post_init__(self) -> None:
        if self.every_steps < 0:
            _fail("checkpoint.every_steps", "must be >= 0 (0 = only at the end)")
        if self.keep_last < 1:
            _fail("checkpoint.keep_last", "must be >= 1")


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
        _check_choices(self, "train")
        if self.max_steps < 0:
            _fail("train.max_steps", "must be >= 0 (0 = data.epochs decides)")
        if self.log_every < 1:
            _fail("train.log_every", "must be >= 1")
        if self.progress_every_s <= 0:
            _fail("train.progress_every_s", "must be > 0")


@dataclass
class TrackingConfig:
    enabled: bool = True
    # Empty means a local store at ./mlruns; http://host:port for a tracking server.
    uri: str = ""
    experiment: str = "avts"
    system_metrics: bool = True
    # Set on the MLflow run of `avts train` and of every `avts eval` job; `avts study` groups its
    # runs by them (avts.study, avts.arm, avts.pretrain_seed).
    tags: dict[str, str] = field(default_factory=dict)
    system_metrics_every_s: float = 10.0
    # Every MLflow HTTP call of the trainer is bounded by these (MLflow's own
    # MLFLOW_HTTP_REQUEST_TIMEOUT / _MAX_RETRIES, which win when set); a background thread makes
    # the calls, so they bound how soon an outage is noticed, never a training step.
    request_timeout_s: int = 10
    request_max_retries: int = 1
    # How long the start waits for the server to create the run (then training starts anyway),
    # and how long the end waits to deliver the backlog (the rest: avts sync-tracking RUN_DIR).
    start_timeout_s: float = 30.0
    flush_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.request_timeout_s < 1:
            _fail("tracking.request_timeout_s", "must be >= 1")
        if self.request_max_retries < 0:
            _fail("tracking.request_max_retries", "must be >= 0")
        if self.system_metrics_every_s <= 0:
            _fail("tracking.system_metrics_every_s", "must be > 0")
        if self.start_timeout_s < 0 or self.flush_timeout_s < 0:
            _fail("tracking.start_timeout_s", "start_timeout_s and flush_timeout_s must be >= 0")


SlurmSignal = Literal["USR2", "USR1", "TERM", "INT", "HUP"]


@dataclass
class LaunchConfig:
    # slurm | local (submitit's local executor, K processes here) | debug (in-process)
    cluster: Literal["slurm", "local", "debug"] = "slurm"
    profile: str = ""
    nodes: int = 1
    gpus_per_node: int = 0
    # 0 means: equal to gpus_per_node (one task per GPU).
    tasks_per_node: int = 0
    partition: str = ""
    time: str = "01:00:00"
    account: str = ""
    qos: str = ""
    constraint: str = ""
    mem: str = ""
    # 0 = auto: with GPUs, the partition's CPUs per GPU as sinfo reports them (else 1).
    cpus_per_task: int = 0
    exclusive: bool = False
    # Sent to every task grace_s before the time limit (and on preemption); the trainer saves.
    signal: SlurmSignal = "USR2"
    grace_s: int = 120
    max_requeues: int = 3
    # submitit's job folder (sbatch script, pickles, per-rank logs); empty: <run.dir>/slurm.
    folder: str = ""
    # Shell lines run in the sbatch script before srun (module load, conda activate, ...).
    setup: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.nodes < 1:
            _fail("launch.nodes", "must be >= 1")
        if self.gpus_per_node < 0 or self.tasks_per_node < 0:
            _fail("launch.tasks_per_node", "gpus_per_node and tasks_per_node must be >= 0")
        if self.cpus_per_task < 0:
            _fail("launch.cpus_per_task", "must be >= 1, or 0 (auto: CPUs per GPU from sinfo)")
        if self.max_requeues < 0:
            _fail("launch.max_requeues", "must be >= 0")
        if not re.fullmatch(r"(\d+-)?\d{1,2}:\d{2}:\d{2}|\d+", self.time):
            _fail("launch.time", f"must be HH:MM:SS, D-HH:MM:SS or minutes, got {self.time!r}")


@dataclass
class SyncEvalConfig:
    """``avts eval sync``: held-out in-sync pairs against each negative kind and an offset sweep."""

    # Split of the dataset; empty: data.val_split.
    split: str = ""
    # Held-out clips evaluated, evenly spread over the split (0: all of them).
    max_clips: int = 64
    # A pair is in sync when the embedding distance is below this (0: loss.margin / 2). A fusion
    # head's logit > 0 is used instead when the model has one.
    threshold: float = 0.0
    # Offsets (seconds) of the accuracy-vs-offset curve.
    offsets: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 1.5, 2.0])

    def __post_init__(self) -> None:
        if self.max_clips < 0:
            _fail("eval.sync.max_clips", "must be >= 0 (0 = every clip of the split)")
        if self.threshold < 0:
            _fail("eval.sync.threshold", "must be >= 0 (0 = loss.margin / 2)")
        if any(o <= 0 for o in self.offsets):
            _fail("eval.sync.offsets", "offsets must be > 0 seconds")


@dataclass
class FinetuneConfig:
    """Fine-tuning the video net with a new linear head (ucf101, hmdb51, multimodal, synthetic)."""

    epochs: int = 5
    lr: float = 1e-3
    weight_decay: float = 1e-4
    dropout: float = 0.5
    # Test clips per video, evenly spaced; video accuracy averages their softmax.
    clips_per_video: int = 3
    # Also train the same architecture from random init with the same recipe.
    scratch_baseline: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "clips_per_video"):
            if getattr(self, name) < 1:
                _fail(f"eval.finetune.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            _fail("eval.finetune.lr", "must be > 0")
        if not 0 <= self.dropout < 1:
            _fail("eval.finetune.dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass
class LinearProbeConfig:
    """A linear classifier on frozen audio features (esc50, dcase2014, multimodal, synthetic)."""

    # Audio net layer whose pooled output is the feature (layer1..layer4, pool).
    feature_layer: str = "pool"
    # multimodal always uses logreg: late fusion needs class probabilities.
    classifier: Literal["svm", "logreg"] = "svm"
    # Inverse regularisation strength (scikit-learn's C).
    c: float = 1.0
    # Log-mel windows of data.clip_seconds per clip, evenly spread; their features are averaged.
    windows: int = 3

    def __post_init__(self) -> None:
        if self.c <= 0:
            _fail("eval.probe.c", "must be > 0")
        if self.windows < 1:
            _fail("eval.probe.windows", f"must be >= 1, got {self.windows}")


# The low-label job's recipes (eval/lowlabel.py): video-only (finetune, probe) and T3's
# audio-visual ones (multimodal: both modalities; silent_audio: early fusion fed silence).
LOWLABEL_RECIPES = ("finetune", "probe", "multimodal", "silent_audio")


@dataclass
class LowLabelConfig:
    """``avts eval lowlabel``: k labelled clips per class from ``eval_train``, scored on all of
    ``eval_test`` (docs/results.md 1.3 and 1.6). Defaults are the protocol's recipe values."""

    # Labelled clips per class; 0 = every eval_train clip (reported as k "all").
    shots: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 0])
    # Fine-tuning seeds f: the k-shot draw, head init, window sampling, augmentation, batch order.
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # finetune | probe (the video net) | multimodal | silent_audio (early fusion only): T3.
    recipes: list[str] = field(default_factory=lambda: ["finetune", "probe"])
    # The recorded label set (index column label_<name>): rhythm | appearance on the synthetic
    # corpus.
    label_set: str = "rhythm"
    # Also run the recipes from a random init (init seed = eval.seed).
    scratch: bool = False
    # Fine-tune: optimizer steps at eval.batch_size, the same for every k (cosine over them).
    steps: int = 60
    lr: float = 3e-3
    weight_decay: float = 1e-4
    dropout: float = 0.5
    # Probe: scikit-learn logistic regression's C; windows averaged into a training feature.
    c: float = 1.0
    probe_windows: int = 4
    # Evenly spaced test windows per eval_test clip, their probabilities averaged (both recipes).
    test_windows: int = 3

    def __post_init__(self) -> None:
        key = "eval.lowlabel"
        if (
            not self.shots
            or any(k < 0 for k in self.shots)
            or len(set(self.shots)) != len(self.shots)
        ):
            _fail(f"{key}.shots", f"distinct values >= 0 (0 = all) expected, got {self.shots}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            _fail(f"{key}.seeds", f"distinct seeds expected, got {self.seeds}")
        unknown = [r for r in self.recipes if r not in LOWLABEL_RECIPES]
        if unknown or not self.recipes:
            _fail(
                f"{key}.recipes",
                f"a subset of {list(LOWLABEL_RECIPES)} expected, got {self.recipes}",
            )
        for name in ("steps", "probe_windows", "test_windows"):
            if getattr(self, name) < 1:
                _fail(f"{key}.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.c <= 0:
            _fail(f"{key}.{'lr' if self.lr <= 0 else 'c'}", "must be > 0")
        if not 0 <= self.dropout < 1:
            _fail(f"{key}.dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass
class EvalConfig:
    checkpoint: str = ""
    # Dataset URL per evaluation (name -> URL); sync and synthetic default to data.url.
    datasets: dict[str, str] = field(default_factory=dict)
    # UCF101/HMDB51 splits to run (split plans: eval/common.py).
    splits: list[int] = field(default_factory=lambda: [1, 2, 3])
    # Caps for toy runs (0: no cap): training clips per split, and test videos per split.
    max_train_videos: int = 0
    max_test_videos: int = 0
    batch_size: int = 16
    num_workers: int = 0
    # auto (cuda when available) | cpu | cuda | cuda:N
    device: str = "auto"
    seed: int = 0
    progress: bool = True
    # MLflow parent run; empty: read <run dir>/mlflow_run_id next to the checkpoint.
    parent_run_id: str = ""
    # Local folder for artifacts (plots, CSVs); empty: <run dir or cwd>/eval/<name>.
    out_dir: str = ""
    sync: SyncEvalConfig = field(default_factory=SyncEvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    probe: LinearProbeConfig = field(default_factory=LinearProbeConfig)
    lowlabel: LowLabelConfig = field(default_factory=LowLabelConfig)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            _fail("eval.batch_size", f"must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            _fail("eval.num_workers", "must be >= 0")
        if self.max_train_videos < 0 or self.max_test_videos < 0:
            _fail("eval.max_train_videos", "caps must be >= 0 (0 = no cap)")
        if any(k not in (1, 2, 3) for k in self.splits) or not self.splits:
            _fail("eval.splits", f"must be a non-empty subset of [1, 2, 3], got {self.splits}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            _fail("eval.device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")


# Keys renamed since configs were first saved (old -> new; None: removed, it did nothing).
# Saved run configs (<run.dir>/config.yaml, read by `avts eval`) and users' overrides keep
# working; a warning names the new key, and resolved configs are written with the new names.
RENAMED_KEYS: dict[str, str | None] = {
    "eval.suite": None,
    "eval.sync_split": "eval.sync.split",
    "eval.sync_max_clips": "eval.sync.max_clips",
    "eval.sync_threshold": "eval.sync.threshold",
    "eval.sync_offsets": "eval.sync.offsets",
    "eval.epochs": "eval.finetune.epochs",
    "eval.lr": "eval.finetune.lr",
    "eval.weight_decay": "eval.finetune.weight_decay",
    "eval.clips_per_video": "eval.finetune.clips_per_video",
    "eval.scratch_baseline": "eval.finetune.scratch_baseline",
    "eval.feature_layer": "eval.probe.feature_layer",
    "eval.classifier": "eval.probe.classifier",
    "eval.svm_c": "eval.probe.c",
    "eval.audio_windows": "eval.probe.windows",
}


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # none | auto (newest complete checkpoint of checkpoint.dir) | a run dir, checkpoints dir,
    # tag dir or URL (s3://..., file://...): see avts_dist.train.checkpoint.resolve_checkpoint
    resume: str = "none"

    def __post_init__(self) -> None:
        if self.train.max_steps == 0 and self.data.epochs == 0:
            _fail("train.max_steps", "set train.max_steps > 0 or data.epochs > 0")
        if self.data.global_batch_size % self.deepspeed.grad_accum_steps:
            _fail(
                "deepspeed.grad_accum_steps",
                f"must divide data.global_batch_size ({self.data.global_batch_size})",
            )
        if self.loss.negatives != "all" and self.loss.num_negatives >= self.data.global_batch_size:
            _fail("loss.num_negatives", "must be < data.global_batch_size")
        if self.train.objective == "video_ssl" and self.model.arch != "two_stream":
            _fail(
                "train.objective",
                "video_ssl trains the video net alone: needs model.arch=two_stream",
            )

    def fill_derived(self) -> Config:
        """Fills defaults that depend on other keys (after every layer has merged)."""
        if not self.run.dir:
            self.run.dir = str(Path("runs") / self.run.name)
        if not self.checkpoint.dir:
            self.checkpoint.dir = str(Path(self.run.dir) / "checkpoints")
        restore_secrets(self)
        return self


# ---------------------------------------------------------------------------------------------
# Loading and saving


def resolve_config_path(path: str | Path) -> Path:
    """A config path as given, or relative to the repository (so `configs/...` works anywhere)."""
    p = Path(path)
    if p.exists():
        return p
    alt = REPO_ROOT / p
    if alt.exists():
        return alt
    raise ConfigError(f"config file not found: {path}")


def _read_yaml_layers(path: Path, seen: tuple[Path, ...] = ()) -> list[dict[str, Any]]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config include cycle: {' -> '.join(str(p) for p in (*seen, path))}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    parents: list[str] = []
    base = raw.pop("base", None)
    if base:
        parents.append(base)
    includes = raw.pop("includes", None) or []
    if isinstance(includes, str):
        includes = [includes]
    parents.extend(includes)
    layers: list[dict[str, Any]] = []
    for parent in parents:
        parent_path = (path.parent / parent) if not Path(parent).is_absolute() else Path(parent)
        if not parent_path.exists():
            raise ConfigError(f"{path}: included file not found: {parent}")
        layers.extend(_read_yaml_layers(parent_path, (*seen, path)))
    layers.append(raw)
    return layers


def _renamed_key(key: str) -> str | None:
    """The current name of ``key`` (None: a removed key), with a warning for an old name."""
    if key not in RENAMED_KEYS:
        return key
    new = RENAMED_KEYS[key]
    log.warning(
        "config key '%s' %s", key, f"is now '{new}'" if new else "was removed (it had no effect)"
    )
    return new


def _rename_keys(tree: dict[str, Any]) -> dict[str, Any]:
    """A YAML layer or saved config with old key names moved to their new places."""
    tree = {k: dict(v) if isinstance(v, dict) else v for k, v in tree.items()}
    for old in RENAMED_KEYS:
        section, _, leaf = old.partition(".")
        node = tree.get(section)
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node.pop(leaf)
        new = _renamed_key(old)
        if new:
            *parents, last = new.split(".")[1:]
            for name in parents:
                node = node.setdefault(name, {})
            node[last] = value
    return tree


def _rename_overrides(overrides: list[str]) -> list[str]:
    out = []
    for item in overrides:
        key, _, value = item.partition("=")
        new = _renamed_key(key)
        if new:
            out.append(f"{new}={value}")
    return out


def _omegaconf_message(exc: OmegaConfBaseException, schema: type = Config) -> str:
    key = getattr(exc, "full_key", None)
    # A section merged on its own (e.g. a checkpoint's model config) names its keys as the
    # whole tree does: model.video_arch, not video_arch.
    section = {hint: name for name, hint in get_type_hints(Config).items()}.get(schema)
    if key and section:
        key = f"{section}.{key}"
    msg = str(exc).split("\n")[0]
    return f"config key '{key}': {msg}" if key else msg


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    schema: type = Config,
) -> Any:
    """Defaults -> YAML (with base/includes) -> dot-list overrides, strict; returns dataclasses."""
    merged: DictConfig = OmegaConf.structured(schema)
    layers = _read_yaml_layers(resolve_config_path(path)) if path else []
    overrides = list(overrides or [])
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
    layers = [_rename_keys(layer) for layer in layers]
    overrides = _rename_overrides(overrides)
    try:
        for layer in layers:
            merged = OmegaConf.merge(merged, layer)
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(overrides))
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(_omegaconf_message(exc, schema)) from None
    return obj.fill_derived() if hasattr(obj, "fill_derived") else obj


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The whole config, credentials included: for passing it on in memory, never to write."""
    return dataclasses.asdict(cfg)


def redacted_config_dict(cfg: Any) -> dict[str, Any]:
    """The config as it may be written anywhere (files, MLflow, checkpoints, logs): storage
    options keep only the values of harmless keys (:func:`avts_dist.storage.redact`)."""
    from avts_dist.storage import redact

    return redact(config_to_dict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg))


def config_to_yaml(cfg: Any) -> str:
    """The redacted config as YAML (what is saved and printed)."""
    return yaml.safe_dump(redacted_config_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Writes the resolved config, redacted, as YAML (atomically) and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(config_to_yaml(cfg))
    tmp.replace(path)
    return path


def config_from_dict(data: dict[str, Any], schema: type = Config) -> Any:
    """Rebuilds a config saved with :func:`config_to_dict` (e.g. from a checkpoint)."""
    try:
        return restore_secrets(
            OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), _rename_keys(data)))
        )
    except OmegaConfBaseException as exc:
        raise ConfigError(_omegaconf_message(exc, schema)) from None


# `avts launch` hands what redaction hides to its jobs in their environment (SLURM keeps a job's
# environment across requeues), never in a file: the job folder holds the redacted config.
SECRETS_ENV = "AVTS_CONFIG_SECRETS"


def config_secrets(cfg: Any) -> dict[str, Any]:
    """``{"data.storage_options.secret": value, ...}``: every value that redaction hides."""
    from avts_dist.storage import REDACTED

    out: dict[str, Any] = {}

    def walk(raw: dict, shown: dict, prefix: str) -> None:
        for key, value in raw.items():
            seen = shown.get(key)
            if isinstance(value, dict) and isinstance(seen, dict):
                walk(value, seen, f"{prefix}{key}.")
            elif isinstance(seen, str) and REDACTED in seen and value != seen:
                out[f"{prefix}{key}"] = value

    walk(config_to_dict(cfg), redacted_config_dict(cfg), "")
    return out


@contextlib.contextmanager
def secrets_in_environment(cfg: Any):
    """``$AVTS_CONFIG_SECRETS`` holds ``cfg``'s secrets while jobs are submitted (they inherit
    it), and is unset again afterwards."""
    secrets = config_secrets(cfg)
    previous = os.environ.get(SECRETS_ENV)
    if secrets:
        os.environ[SECRETS_ENV] = json.dumps(secrets)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(SECRETS_ENV, None)
        else:
            os.environ[SECRETS_ENV] = previous


def restore_secrets(cfg: Any, secrets: dict[str, Any] | None = None) -> Any:
    """Puts ``secrets`` (default: the JSON in ``$AVTS_CONFIG_SECRETS``) back where ``cfg`` holds
    a redaction placeholder; values the user gave again are kept."""
    from avts_dist.storage import REDACTED

    if secrets is None:
        text = os.environ.get(SECRETS_ENV, "")
        try:
            secrets = json.loads(text) if text else {}
        except json.JSONDecodeError:
            raise ConfigError(f"${SECRETS_ENV} is not valid JSON") from None
    for path, value in secrets.items():
        *parents, leaf = path.split(".")
        node: Any = cfg
        for name in parents:
            node = node.get(name) if isinstance(node, dict) else getattr(node, name, None)
        if isinstance(node, dict):
            if isinstance(node.get(leaf), str) and REDACTED in node[leaf]:
                node[leaf] = value
        elif node is not None and REDACTED in str(getattr(node, leaf, "")):
            setattr(node, leaf, value)
    return cfg


def flatten_config(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"data.fps": 8.0, "curriculum.stages": "[...]", ...}`` for MLflow params, redacted.

    Nested mappings are flattened with dots; lists become their JSON text.
    """
    # Nested calls get already-redacted mappings; a sub-config (``cfg.eval``) is redacted too.
    data = redacted_config_dict(cfg) if dataclasses.is_dataclass(cfg) or not prefix else cfg
    out: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_config(value, prefix=f"{full}."))
        elif isinstance(value, (list, dict)):
            out[full] = json.dumps(value)
        else:
            out[full] = value
    return out
