"""The DeepSpeed engine: its JSON config generated from the typed config, initialize, the
optimizer step, and everything that knows DeepSpeed's checkpoint files (the sharded save/load,
which files a rank writes, the fp32 consolidation with ``zero_to_fp32`` and the conversion to a
universal checkpoint with ``ds_to_universal``). Nothing outside this module names those files.

The generated JSON covers what the typed config names (ZeRO stage, precision, gradient
accumulation and clipping, AdamW/Adam/SGD, warmup + cosine or constant LR). Any other DeepSpeed
key goes through the escape hatch ``deepspeed.extra``: a mapping merged recursively last, e.g.
``deepspeed.extra={zero_optimization: {overlap_comm: true}}`` or, in YAML::

    deepspeed:
      extra:
        zero_optimization: {contiguous_gradients: true}
        comms_logger: {enabled: true}

``deepspeed`` itself is imported inside the functions that need it, on purpose: importing it
costs seconds and probes the accelerator, and the config builder, the export of a ZeRO-0
checkpoint and the unit tests need none of that.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib
import io
import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch

from avts_dist.config import DeepSpeedConfig, OptimConfig, deep_merge
from avts_dist.distributed.collectives import free_port, resolve_backend
from avts_dist.extras import import_deepspeed
from avts_dist.integrity import FileRecord, file_record, save_torch

__all__ = [
    "build_ds_config",
    "consolidated_fp32_state_dict",
    "convert_to_universal",
    "estimate_checkpoint_bytes",
    "initialize_engine",
    "load_engine_checkpoint",
    "optimizer_step",
    "read_client_state",
    "save_engine_checkpoint",
    "SaveOutcome",
    "snapshot_engine_checkpoint",
]

# Written into every checkpoint's client state: ds_to_universal refuses a checkpoint without it.
UNIVERSAL_CHECKPOINT_INFO = {"universal_checkpoint_version": 0.2}
# The model-states file of ZeRO 0-2 (written by data-parallel rank 0), and of ZeRO-3's rank 0.
_MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def build_ds_config(
    ds: DeepSpeedConfig,
    optim: OptimConfig,
    *,
    global_batch_size: int,
    world_size: int,
    total_steps: int,
    load_universal: bool = False,
    use_cuda: bool | None = None,
) -> dict[str, Any]:
    """The DeepSpeed JSON for this run; ``ds.extra`` is merged over it last.

    Needs no compiled DeepSpeed op on any device: the optimizer is torch's own (fused kernels on
    CUDA), never DeepSpeed's JIT-built FusedAdam. Gradients are accumulated and all-reduced in
    fp32 at every precision (``data_types.grad_accum_dtype``, ``communication_data_type``).

    ``precision=bf16`` is torch.autocast through DeepSpeed's ``torch_autocast``: convolutions and
    matmuls compute in bf16, while weights (the fp32 master copy at any ZeRO stage), gradients,
    optimizer state and BatchNorm (with its running statistics) stay fp32. DeepSpeed's own
    ``bf16`` mode is not used: it casts the weights, and since 0.19.2 keeps the buffers fp32, so a
    BatchNorm gets bf16 weights beside fp32 running statistics, which torch's batch_norm rejects.
    """
    use_cuda = torch.cuda.is_available() if use_cuda is None else use_cuda
    if global_batch_size % (world_size * ds.grad_accum_steps):
        raise ValueError(
            f"data.global_batch_size={global_batch_size} is not divisible by world size "
            f"{world_size} x deepspeed.grad_accum_steps={ds.grad_accum_steps}"
        )
    micro = global_batch_size // (world_size * ds.grad_accum_steps)
    opt_name = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD"}[optim.name]
    opt_params: dict[str, Any] = {"lr": optim.lr, "weight_decay": optim.weight_decay}
    if optim.name in ("adamw", "adam"):
        opt_params["betas"] = list(optim.betas)
        # torch.optim's Adam/AdamW instead of DeepSpeed's FusedAdam, which is JIT-compiled at
        # start (minutes, and an nvcc matching torch's CUDA) when DeepSpeed is installed with
        # DS_BUILD_OPS=0. torch's fused CUDA kernel needs no build.
        opt_params["torch_adam"] = True
        if use_cuda:
            opt_params["fused"] = True
    else:
        opt_params["momentum"] = optim.betas[0]
    warmup = max(0, min(optim.warmup_steps, total_steps - 1))
    if optim.schedule == "cosine":
        scheduler = {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": max(total_steps, 1),
                # DeepSpeed wants >= 1 warmup step: with none asked for, that step is at full LR.
                "warmup_num_steps": max(warmup, 1),
                "warmup_min_ratio": 0.0 if warmup else 1.0,
                "cos_min_ratio": optim.min_lr_ratio,
                "warmup_type": "linear",
            },
        }
    else:
        scheduler = {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0.0 if warmup else optim.lr,
                "warmup_max_lr": optim.lr,
                "warmup_num_steps": max(warmup, 1),
                "warmup_type": "linear",
            },
        }
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage > 0 and (not use_cuda or ds.backend == "gloo"):
        # gloo has no reduce_scatter; ZeRO then reduces with all-reduce.
        zero["reduce_scatter"] = False
    if ds.zero_stage in (1, 2) and not use_cuda:
        # The GPU-sized default buckets (5e8 elements) are allocated on every backward: on CPU
        # that alone costs seconds per step.
        zero["reduce_bucket_size"] = int(2e6)
        zero["allgather_bucket_size"] = int(2e6)
    config: dict[str, Any] = {
        "train_batch_size": global_batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": ds.grad_accum_steps,
        "gradient_clipping": optim.grad_clip,
        "optimizer": {"type": opt_name, "params": opt_params},
        "scheduler": scheduler,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": bool(load_universal)},
        "data_types": {"grad_accum_dtype": "fp32"},
        "communication_data_type": "fp32",
    }
    if ds.precision == "bf16":
        # No module is "lower-precision safe": DeepSpeed would all-reduce those gradients in bf16.
        config["torch_autocast"] = {
            "enabled": True,
            "dtype": "bfloat16",
            "lower_precision_safe_modules": [],
        }
    return deep_merge(config, dict(ds.extra or {}))


class _DropStartupNoise(logging.Filter):
    """DeepSpeed's start-up warnings that say nothing about this run: the LR scheduler's first
    get_lr() (at step -1, by construction) asks for the LR before its first step."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "before it has started" not in record.getMessage()


def _quiet_deepspeed() -> None:
    """Imports DeepSpeed (:func:`import_deepspeed`) and quiets it, before it is used."""
    # Named, DeepSpeed's accelerator is chosen without its "Setting accelerator to CPU. If you
    # have GPU..." warning (what auto-detection would pick: cuda when torch sees a GPU).
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    ds_logger = logging.getLogger("DeepSpeed")
    ds_logger.setLevel(logging.WARNING)
    if not any(isinstance(f, _DropStartupNoise) for f in ds_logger.filters):
        ds_logger.addFilter(_DropStartupNoise())
    import_deepspeed()  # after the logger is set (as before this function imported it)
    if os.environ.get("AVTS_DS_SHM_COMM", "0") != "1":
        # DeepSpeed's CPU shared-memory all-reduce is JIT-compiled on first use (minutes, and a
        # compiler); gloo does the same job here. AVTS_DS_SHM_COMM=1 turns it back on.
        # By module path: the attribute deepspeed.comm.torch is the torch package itself.
        ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
        ds_torch_comm.build_shm_op = lambda: None


def initialize_engine(model: torch.nn.Module, ds_config: dict[str, Any], *, backend: str = "auto"):
    """``deepspeed.initialize`` on an already initialized process group (or a single process)."""
    _quiet_deepspeed()
    deepspeed = import_deepspeed()  # imported by _quiet_deepspeed: the module

    # DeepSpeed checks the launcher's variables even when the group already exists, and reads
    # LOCAL_RANK as its CUDA ordinal: give it the device the group was set up on.
    if torch.distributed.is_initialized():
        os.environ.setdefault("RANK", str(torch.distributed.get_rank()))
        os.environ.setdefault("WORLD_SIZE", str(torch.distributed.get_world_size()))
    else:
        # A single process without launcher: DeepSpeed still wants a process group.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        os.environ["LOCAL_RANK"] = str(torch.cuda.current_device())
    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(dist_backend=resolve_backend(backend), verbose=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=trainable, config=ds_config
    )
    return engine


def optimizer_step(engine, *, skip: bool) -> bool:
    """``engine.step()`` for the last micro-batch of an optimizer step; returns whether the
    weights were updated.

    ``skip`` (a non-finite loss on some rank, agreed by every rank) leaves weights, optimizer
    state and LR schedule as they were. ZeRO >= 1: DeepSpeed's own overflow check finds the
    non-finite gradient norm, clears its gradient partitions and skips the update. ZeRO-0 has no
    such check: the gradients are dropped here and the update is not called; only DeepSpeed's
    micro-step counter moves on, so that the next accumulation boundary stays where it was.
    """
    if skip and not engine.zero_optimization():
        engine.zero_grad()
        engine.micro_steps += 1
        return False
    engine.step()
    return bool(engine.was_step_applied()) and not skip


# ---------------------------------------------------------------------------------------------
# Checkpoint files


class SaveOutcome(NamedTuple):
    """What one rank's part of a sharded save left: the files it wrote (relative to the tag dir)
    with their size and sha256, and the first ``OSError`` of a write (then nothing more was
    written) with the file it hit."""

    records: dict[str, FileRecord]
    error: OSError | None = None
    error_file: str = ""


@functools.cache
def _recording_engine_class():
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class RecordingCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch.save engine writing through ``save_torch``: each file's size and
        sha256 come from the bytes being written, and a failed write is kept in ``outcome``, not
        raised, so that this rank still meets the other ranks at the barriers inside
        ``save_checkpoint`` (a raise there would leave them waiting)."""

        outcome = SaveOutcome({})

        def save(self, state_dict, path: str):
            if self.outcome.error is not None:
                return  # the first failure stands; nothing more is written
            try:
                record = save_torch(
                    state_dict, path, zipfile_serialization=self.zipfile_serialization
                )
            except OSError as exc:
                self.outcome = SaveOutcome(self.outcome.records, exc, path)
            else:
                self.outcome.records[path] = record

    return RecordingCheckpointEngine


def _recording_engine(engine):
    """The engine's checkpoint engine, swapped once for the recording one; None when DeepSpeed
    was configured with another (asynchronous) engine, whose files are then hashed after the
    save."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    recording_class = _recording_engine_class()
    current = engine.checkpoint_engine
    if isinstance(current, recording_class):
        return current
    if type(current) is not TorchCheckpointEngine:
        return None
    recording = recording_class.__new__(recording_class)
    recording.__dict__.update(current.__dict__)
    engine.checkpoint_engine = recording
    # DeepSpeed copies its zero_to_fp32.py next to the tags on every save: on a full disk that
    # copy would raise on rank 0 alone. Our export calls the library, so the copy is optional.
    copy_script = engine._copy_recovery_script

    def copy_recovery_script(path):
        with contextlib.suppress(OSError):
            copy_script(path)

    engine._copy_recovery_script = copy_recovery_script
    return recording


def save_engine_checkpoint(
    engine, save_dir: str | Path, tag: str, client_state: dict[str, Any]
) -> SaveOutcome:
    """Sharded save on every rank (collective); returns this rank's files with their size and
    sha256, or the first write error (the other ranks still finish their part).

    ``latest`` is not touched: the checkpoint manager publishes a tag once it is whole.
    """
    state = dict(client_state)
    state.setdefault("universal_checkpoint_info", dict(UNIVERSAL_CHECKPOINT_INFO))
    tag_dir = Path(save_dir) / tag
    # Every rank creates the tag dir: on node-local disks DeepSpeed's rank 0 sees only its own.
    # A failure here shows as the failed write of the first file.
    with contextlib.suppress(OSError):
        tag_dir.mkdir(parents=True, exist_ok=True)
    recording = _recording_engine(engine)
    if recording is not None:
        recording.outcome = SaveOutcome({})
    engine.save_checkpoint(str(save_dir), tag=tag, client_state=state, save_latest=False)
    written = []
    if engine.save_non_zero_checkpoint:
        written.append(engine._get_ckpt_name(str(save_dir), tag))
    if engine.save_zero_checkpoint:
        written.append(engine._get_zero_ckpt_name(str(save_dir), tag))
    if recording is not None:
        outcome = recording.outcome
        if outcome.error is not None:
            return SaveOutcome({}, outcome.error, os.path.relpath(outcome.error_file, tag_dir))
        records = outcome.records
    else:
        records = {p: file_record(p) for p in written if os.path.isfile(p)}
    missing = [p for p in written if p not in records]
    if missing:
        raise RuntimeError(f"DeepSpeed did not write the files its layout names: {missing}")
    return SaveOutcome({os.path.relpath(p, tag_dir): records[p] for p in written})


def host_copy(obj: Any) -> Any:
    """A copy of a state in host memory that the training can no longer change."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, host_copy(v)) for k, v in obj.items())
    if isinstance(obj, list | tuple) and type(obj) in (list, tuple):
        return type(obj)(host_copy(v) for v in obj)
    return copy.deepcopy(obj)


@functools.cache
def _snapshot_engine_class():
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class SnapshotCheckpointEngine(TorchCheckpointEngine):
        """Writes nothing: keeps a host-memory copy of each file's state, for a background
        writer (after torch.distributed.checkpoint.async_save's staging)."""

        snapshots: dict[str, Any] = {}

        def save(self, state_dict, path: str):
            self.snapshots[path] = host_copy(state_dict)

    return SnapshotCheckpointEngine


def snapshot_engine_checkpoint(
    engine, save_dir: str | Path, tag: str, client_state: dict[str, Any]
) -> dict[str, Any] | None:
    """The sharded save of :func:`save_engine_checkpoint` (collective), with nothing written:
    this rank's files as host-memory copies of their states, by name in the tag dir. None when
    DeepSpeed was configured with a checkpoint engine of its own (then write with the former)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine and not isinstance(
        current, _recording_engine_class()
    ):
        return None
    snapshot = _snapshot_engine_class().__new__(_snapshot_engine_class())
    snapshot.__dict__.update(current.__dict__, snapshots={})
    engine.checkpoint_engine = snapshot
    state = {"universal_checkpoint_info": dict(UNIVERSAL_CHECKPOINT_INFO), **client_state}
    try:
        engine.save_checkpoint(str(save_dir), tag=tag, client_state=state, save_latest=False)
    finally:
        engine.checkpoint_engine = current
    tag_dir = Path(save_dir) / tag
    return {os.path.relpath(p, tag_dir): s for p, s in snapshot.snapshots.items()}


def estimate_checkpoint_bytes(engine) -> int:
    """About how many bytes a checkpoint of this engine takes on disk, before any was written:
    the module's state (weights and buffers) plus the optimizer's per-parameter state (two fp32
    moments for Adam/AdamW, one for SGD with momentum) and, under ZeRO, its fp32 master copy."""
    module_bytes = sum(t.numel() * t.element_size() for t in engine.module.state_dict().values())
    num_params = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    num_states = 2 if "adam" in type(inner).__name__.lower() else 1
    if engine.zero_optimization():
        num_states += 1
    return module_bytes + 4 * num_states * num_params


def load_engine_checkpoint(engine, load_dir: str | Path, tag: str) -> dict[str, Any]:
    """Loads model, optimizer and LR scheduler shards; returns the client state."""
    path, client_state = engine.load_checkpoint(
        str(load_dir),
        tag=tag,
        load_module_strict=True,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {load_dir}/{tag}")
    return client_state or {}


def _model_states_file(tag_dir: Path) -> Path:
    for name in _MODEL_STATES:
        if (tag_dir / name).is_file():
            return tag_dir / name
    raise FileNotFoundError(f"{tag_dir} holds no DeepSpeed model states ({_MODEL_STATES[0]})")


def read_client_state(tag_dir: str | Path) -> dict[str, Any]:
    """The client state saved with a checkpoint tag (plus DeepSpeed's own keys)."""
    # Our own DeepSpeed checkpoint (it pickles its config objects): weights_only=False is needed.
    return torch.load(_model_states_file(Path(tag_dir)), map_location="cpu", weights_only=False)


@contextlib.contextmanager
def _without_progress_bar(module):
    """``module.tqdm`` replaced by the plain iterable while the block runs."""
    saved = module.tqdm
    module.tqdm = lambda iterable, **_: iterable
    try:
        yield
    finally:
        module.tqdm = saved


def consolidated_fp32_state_dict(
    tag_dir: str | Path, zero_stage: int
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The full fp32 model state dict of a local checkpoint tag, and its client state.

    ZeRO >= 1: the fp32 master weights, gathered from the optimizer shards by DeepSpeed's
    ``zero_to_fp32``. ZeRO-0: the module weights, which are the fp32 master weights at every
    precision here (bf16 is autocast); a checkpoint with low-precision weights is refused.
    """
    tag_dir = Path(tag_dir)
    client = read_client_state(tag_dir)
    if zero_stage > 0:
        _quiet_deepspeed()
        from deepspeed.utils import zero_to_fp32

        # It prints its progress: tqdm over the shard files (on stderr) and details on stdout,
        # which belongs to the caller (`avts eval --json`).
        with (
            _without_progress_bar(zero_to_fp32),
            contextlib.redirect_stdout(io.StringIO()),
        ):
            state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(
                str(tag_dir.parent), tag=tag_dir.name
            )
    else:
        state = client["module"]
        low = sorted(
            k for k, v in state.items() if v.is_floating_point() and v.dtype != torch.float32
        )
        if low:
            raise ValueError(
                f"{tag_dir} is a ZeRO-0 checkpoint with {state[low[0]].dtype} weights ({low[0]}, "
                "...) and no fp32 master copy"
            )
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, client


def convert_to_universal(tag_dir: str | Path, out_dir: str | Path, *, num_workers: int = 1) -> Path:
    """DeepSpeed's ``ds_to_universal`` on one checkpoint tag directory (run on one rank)."""
    import_deepspeed()
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = argparse.Namespace(
        input_folder=str(tag_dir),
        output_folder=str(out_dir),
        num_extract_workers=num_workers,
        num_merge_workers=num_workers,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )
    with contextlib.redirect_stdout(io.StringIO()):
        ds_to_universal(args)
    return Path(out_dir)
