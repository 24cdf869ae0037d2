"""The exported weights file: the file ``avts export`` writes and evaluation reads.

Format (version 1), a ``torch.save`` dict of plain types and fp32 tensors, loadable with
``torch.load(weights_only=True)``::

    {"format_version": 1, "model_config": asdict(cfg.model), "objective": "avts",
     "video": video_state_dict, "audio": audio_state_dict, "heads": head_state_dict,
     "source_checkpoint": str, "step": int}

``objective`` is ``train.objective``; a ``video_ssl`` export (the video-only baseline) has no
``audio`` entry and its ``heads`` hold the projection head; asking it for the audio net is an
:class:`ExportError` that says so. Files written before ``objective`` existed are ``avts``.

The path may be local or any fsspec URL (``s3://...``); :func:`read_torch_file` is the one reader
of a weights file, for exports and ``model.init_from`` alike.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import torch
from torch import nn

from avts_dist.config import ConfigError, ModelConfig, config_from_dict
from avts_dist.storage import StorageError, get_fs

__all__ = [
    "EXPORT_FORMAT_VERSION",
    "ExportError",
    "export_payload",
    "load_exported",
    "model_config_from_export",
    "read_torch_file",
    "require_audio",
    "save_exported",
]

EXPORT_FORMAT_VERSION = 1
_REQUIRED = ("format_version", "model_config", "video", "heads")


class ExportError(ValueError):
    """A weights file that cannot be used, with the reason in words."""


def _fp32_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Floating tensors to fp32 (bf16/fp16 training), integer buffers (num_batches_tracked) kept.
    return {
        k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
        for k, v in state.items()
    }


def export_payload(
    model: nn.Module, model_cfg: ModelConfig, source_checkpoint: str = "", step: int = 0
) -> dict[str, Any]:
    """The export dict for ``model`` (unwrap DeepSpeed/DDP first: ``engine.module``); a
    ``VideoSSLModel`` gives a video-only export."""
    payload = {
        "format_version": EXPORT_FORMAT_VERSION,
        "model_config": dataclasses.asdict(model_cfg),
        "objective": getattr(model, "objective", "avts"),
        "video": _fp32_cpu(model.video.state_dict()),
        "heads": _fp32_cpu(model.heads.state_dict()),
        "source_checkpoint": str(source_checkpoint),
        "step": int(step),
    }
    if hasattr(model, "audio"):
        payload["audio"] = _fp32_cpu(model.audio.state_dict())
    return payload


def require_audio(payload: dict[str, Any], what: str) -> None:
    """ExportError unless the export has an audio net (a ``video_ssl`` export has none)."""
    if "audio" not in payload:
        objective = payload.get("objective", "avts")
        raise ExportError(
            f"{what} was pretrained with train.objective={objective} and has no audio net; "
            "its video net alone is usable (part='video', the video evaluation jobs)"
        )


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


def read_torch_file(
    url: str, storage_options: dict | None = None, *, expected: str = "a torch file"
) -> Any:
    """The object in a ``torch.save`` file (local or fsspec URL), read ``weights_only``;
    ExportError ``file not found``, unreadable, or ``{url} is not {expected}``."""
    try:
        fs, fs_path = get_fs(url, storage_options)
        data = fs.cat_file(fs_path)
    except FileNotFoundError:
        raise ExportError(f"file not found: {url}") from None
    except (StorageError, OSError) as exc:
        raise ExportError(f"cannot read {url}: {exc}") from None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types (pickle, zip, unsupported global)
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ExportError(f"{url} is not {expected}: {msg}") from None


def load_exported(path: str, storage_options: dict | None = None) -> dict[str, Any]:
    """Reads and validates an export; raises :class:`ExportError` naming the problem."""
    payload = read_torch_file(path, storage_options, expected="an exported weights file")
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
        if key in payload and not isinstance(payload[key], dict):
            raise ExportError(f"{path}: '{key}' must be a state_dict")
    return payload


def model_config_from_export(payload: dict[str, Any]) -> ModelConfig:
    try:
        return config_from_dict(payload["model_config"], schema=ModelConfig)
    except ConfigError as exc:
        raise ExportError(f"export's model_config is invalid: {exc}") from None
