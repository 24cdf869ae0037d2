"""Exported pretraining weights: the file ``avts export`` writes and evaluation reads.

Format (version 1), a ``torch.save`` dict of plain types and fp32 tensors, loadable with
``torch.load(weights_only=True)``::

    {"format_version": 1, "model_config": asdict(cfg.model),
     "video": video_state_dict, "audio": audio_state_dict, "heads": head_state_dict,
     "source_checkpoint": str, "step": int}

The path may be local or any fsspec URL (``s3://...``).
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import torch

from avts_dist.config import ConfigError, ModelConfig, config_from_dict
from avts_dist.models.audio import AudioVGG
from avts_dist.models.avts import AVTSModel, build_audio_net, build_video_net
from avts_dist.models.video import VideoResNet
from avts_dist.storage import StorageError, get_fs

__all__ = [
    "EXPORT_FORMAT_VERSION",
    "ExportError",
    "build_audio_net_from_export",
    "build_model_from_export",
    "build_video_net_from_export",
    "export_payload",
    "load_exported",
    "model_config_from_export",
    "save_exported",
]

EXPORT_FORMAT_VERSION = 1
_REQUIRED = ("format_version", "model_config", "video", "audio", "heads")


class ExportError(ValueError):
    """An exported weights file that cannot be used, with the reason in words."""


def _fp32_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Floating tensors to fp32 (bf16/fp16 training), integer buffers (num_batches_tracked) kept.
    return {
        k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
        for k, v in state.items()
    }


def export_payload(
    model: AVTSModel, model_cfg: ModelConfig, source_checkpoint: str = "", step: int = 0
) -> dict[str, Any]:
    """The export dict for ``model`` (unwrap DeepSpeed/DDP first: ``engine.module``)."""
    return {
        "format_version": EXPORT_FORMAT_VERSION,
        "model_config": dataclasses.asdict(model_cfg),
        "video": _fp32_cpu(model.video.state_dict()),
        "audio": _fp32_cpu(model.audio.state_dict()),
        "heads": _fp32_cpu(model.heads.state_dict()),
        "source_checkpoint": str(source_checkpoint),
        "step": int(step),
    }


def save_exported(payload: dict[str, Any], path: str, storage_options: dict | None = None) -> str:
    """Writes ``payload`` to ``path`` (local or fsspec URL) in one write; returns the path."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    fs, fs_path = get_fs(path, storage_options)
    parent = fs_path.rsplit("/", 1)[0] if "/" in fs_path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = fs_path + ".tmp"
    # Write then rename, so a reader never sees a half-written file (rename is a copy on S3).
    with fs.open(tmp, "wb") as f:
        f.write(buf.getvalue())
    fs.mv(tmp, fs_path)
    return path


def load_exported(path: str, storage_options: dict | None = None) -> dict[str, Any]:
    """Reads and validates an export; raises :class:`ExportError` naming the problem."""
    try:
        fs, fs_path = get_fs(path, storage_options)
        if not fs.exists(fs_path):
            raise ExportError(f"exported weights not found: {path}")
        data = fs.cat_file(fs_path)
    except (StorageError, OSError) as exc:
        raise ExportError(f"cannot read exported weights {path}: {exc}") from None
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types (pickle, zip, unsupported global)
        raise ExportError(f"{path} is not an exported weights file: {exc}") from None
    if not isinstance(payload, dict):
        raise ExportError(f"{path}: expected a dict, got {type(payload).__name__}")
    missing = [k for k in _REQUIRED if k not in payload]
    if missing:
        raise ExportError(f"{path}: not an avts export, missing key(s) {missing}")
    version = payload["format_version"]
    if version != EXPORT_FORMAT_VERSION:
        raise ExportError(
            f"{path}: export format_version {version!r}, this code reads {EXPORT_FORMAT_VERSION}"
        )
    for key in ("video", "audio", "heads"):
        if not isinstance(payload[key], dict):
            raise ExportError(f"{path}: '{key}' must be a state_dict")
    return payload


def model_config_from_export(payload: dict[str, Any]) -> ModelConfig:
    try:
        return config_from_dict(payload["model_config"], schema=ModelConfig)
    except ConfigError as exc:
        raise ExportError(f"export's model_config is invalid: {exc}") from None


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ExportError(
            f"{what} weights do not match the exported model_config: {first[:3]}"
        ) from None


def build_video_net_from_export(
    path: str, storage_options: dict | None = None, **overrides: Any
) -> VideoResNet:
    """The pretrained video backbone (headless); ``overrides`` change ModelConfig runtime options
    such as ``activation_checkpointing`` (never the architecture)."""
    payload = load_exported(path, storage_options)
    cfg = dataclasses.replace(model_config_from_export(payload), **overrides)
    net = build_video_net(cfg)
    _load_strict(net, payload["video"], "video")
    return net


def build_audio_net_from_export(
    path: str, storage_options: dict | None = None, **overrides: Any
) -> AudioVGG:
    payload = load_exported(path, storage_options)
    cfg = dataclasses.replace(model_config_from_export(payload), **overrides)
    net = build_audio_net(cfg)
    _load_strict(net, payload["audio"], "audio")
    return net


def build_model_from_export(path: str, storage_options: dict | None = None) -> AVTSModel:
    """The whole two-stream model with its heads (e.g. for sync evaluation)."""
    payload = load_exported(path, storage_options)
    model = AVTSModel(model_config_from_export(payload))
    _load_strict(model.video, payload["video"], "video")
    _load_strict(model.audio, payload["audio"], "audio")
    _load_strict(model.heads, payload["heads"], "heads")
    return model
