"""A training checkpoint -> exported fp32 weights (``avts export``; the format in ``format.py``).

The one part of ``avts_dist.export`` that reads DeepSpeed checkpoints: ZeRO shards are gathered
with DeepSpeed's zero_to_fp32. Import it only to export (``avts_dist.export`` itself stays free of
the training stack).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import torch

from avts_dist.config import ConfigError, ModelConfig, config_from_dict
from avts_dist.distributed.engine import consolidated_fp32_state_dict
from avts_dist.export.card import write_model_card
from avts_dist.export.format import export_payload, save_exported
from avts_dist.models import build_model
from avts_dist.storage import StorageError, join
from avts_dist.train.checkpoint import (
    CheckpointError,
    CheckpointRef,
    fetch_checkpoint,
    resolve_checkpoint,
    validate,
)

__all__ = ["ExportFailed", "consolidated_state_dict", "export_checkpoint"]


class ExportFailed(RuntimeError):
    pass


def consolidated_state_dict(root: Path, tag: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Full fp32 model state dict and the client state of a local, validated checkpoint tag."""
    meta = validate(Path(root) / tag)
    return consolidated_fp32_state_dict(Path(root) / tag, int(meta.get("zero_stage", 0)))


def _load(ref: CheckpointRef) -> tuple[dict[str, torch.Tensor], dict]:
    with tempfile.TemporaryDirectory(prefix="avts-export-") as tmp:
        local_root = fetch_checkpoint(ref, tmp)  # verified: sizes, then sha256
        return consolidated_fp32_state_dict(local_root / ref.tag, ref.zero_stage)


def export_checkpoint(
    checkpoint: str, out: str, *, tag: str | None = None, storage_options: dict | None = None
) -> tuple[str, int]:
    """Writes the fp32 weights of ``checkpoint`` (any path/URL ``resolve_checkpoint`` takes;
    ``tag`` picks one tag of a checkpoints dir) to ``out``; returns ``(out, step)``."""
    try:
        ref = resolve_checkpoint(join(checkpoint, tag) if tag else checkpoint, storage_options)
        state, client = _load(ref)
    except CheckpointError as exc:
        raise ExportFailed(str(exc)) from None
    except (StorageError, OSError, ValueError) as exc:
        raise ExportFailed(f"cannot read checkpoint {checkpoint}: {exc}") from None
    try:
        model_cfg = config_from_dict(client["config"]["model"], schema=ModelConfig)
    except (KeyError, ConfigError) as exc:
        raise ExportFailed(f"checkpoint {ref.url} has no usable model config: {exc}") from None
    # The architecture and objective the run trained (two-stream, early fusion or video_ssl);
    # init_from is cleared: those weights are in the checkpoint already.
    objective = client["config"].get("train", {}).get("objective", "avts")
    model = build_model(dataclasses.replace(model_cfg, init_from=""), objective=objective)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportFailed(
            f"checkpoint weights do not fit model config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    step = int(client.get("trainer", {}).get("step", 0))
    payload = export_payload(model, model_cfg, source_checkpoint=ref.url, step=step)
    save_exported(payload, out, storage_options)
    write_model_card(
        payload, out, storage_options=storage_options, config=client["config"],
        trainer_state=client.get("trainer"),
    )  # fmt: skip
    return out, step
