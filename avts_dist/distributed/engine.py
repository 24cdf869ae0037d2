"""The DeepSpeed engine: its JSON config generated from the typed config, initialize, sharded
save/load, and conversion to DeepSpeed's universal checkpoint for a different world size.

The generated JSON covers what the typed config names (ZeRO stage, precision, gradient
accumulation and clipping, AdamW/Adam/SGD, warmup + cosine or constant LR). Any other DeepSpeed
key goes through the escape hatch ``deepspeed.extra``: a mapping merged recursively last, e.g.
``deepspeed.extra={zero_optimization: {overlap_comm: true}}`` or, in YAML::

    deepspeed:
      extra:
        zero_optimization: {contiguous_gradients: true}
        comms_logger: {enabled: true}
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
from pathlib import Path
from typing import Any

import torch

from avts_dist.config import DeepSpeedConfig, OptimConfig

__all__ = [
    "build_ds_config",
    "convert_to_universal",
    "initialize_engine",
    "load_engine_checkpoint",
    "resolve_backend",
    "save_engine_checkpoint",
]

# Written into every checkpoint's client state: ds_to_universal refuses a checkpoint without it.
UNIVERSAL_CHECKPOINT_INFO = {"universal_checkpoint_version": 0.2}


def resolve_backend(backend: str = "auto") -> str:
    if backend != "auto":
        return backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


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
    """The DeepSpeed JSON for this run; ``ds.extra`` is merged over it last."""
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
        # DeepSpeed's fused Adam needs a compiled CUDA op; torch's own is the CPU path.
        opt_params["torch_adam"] = not use_cuda
    else:
        opt_params["momentum"] = optim.betas[0]
    warmup = max(0, min(optim.warmup_steps, total_steps - 1))
    if optim.schedule == "cosine":
        scheduler = {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": max(total_steps, 1),
                "warmup_num_steps": warmup,
                "warmup_min_ratio": 0.0,
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
    if ds.zero_stage > 0 and resolve_backend(ds.backend) == "gloo":
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
    }
    if ds.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif ds.precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return _deep_merge(config, dict(ds.extra or {}))


def _quiet_deepspeed() -> None:
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if os.environ.get("AVTS_DS_SHM_COMM", "0") != "1":
        # DeepSpeed's CPU shared-memory all-reduce is JIT-compiled on first use (minutes, and a
        # compiler); gloo does the same job here. AVTS_DS_SHM_COMM=1 turns it back on.
        import importlib

        # By module path: the attribute deepspeed.comm.torch is the torch package itself.
        ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
        ds_torch_comm.build_shm_op = lambda: None


def initialize_engine(model: torch.nn.Module, ds_config: dict[str, Any], *, backend: str = "auto"):
    """``deepspeed.initialize`` on an already initialized process group (or a single process)."""
    _quiet_deepspeed()
    import deepspeed

    # DeepSpeed checks the launcher's variables even when the group already exists.
    if torch.distributed.is_initialized():
        os.environ.setdefault("RANK", str(torch.distributed.get_rank()))
        os.environ.setdefault("WORLD_SIZE", str(torch.distributed.get_world_size()))
        os.environ.setdefault("LOCAL_RANK", "0")
    else:
        # A single process without launcher: DeepSpeed still wants a process group.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(dist_backend=resolve_backend(backend), verbose=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=trainable, config=ds_config
    )
    return engine


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_engine_checkpoint(
    engine, save_dir: str | Path, tag: str, client_state: dict[str, Any]
) -> None:
    """Sharded save on every rank; ``latest`` is not touched (the checkpoint manager publishes)."""
    state = dict(client_state)
    state.setdefault("universal_checkpoint_info", dict(UNIVERSAL_CHECKPOINT_INFO))
    engine.save_checkpoint(str(save_dir), tag=tag, client_state=state, save_latest=False)


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


def convert_to_universal(tag_dir: str | Path, out_dir: str | Path, *, num_workers: int = 1) -> Path:
    """DeepSpeed's ``ds_to_universal`` on one checkpoint tag directory (run on one rank)."""
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
