"""Checkpoint -> exported fp32 weights (the file evaluation reads; format in models/export.py)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from avts_dist.config import ConfigError, ModelConfig, config_from_dict
from avts_dist.storage import StorageError, get_fs, join
from avts_dist.train.checkpoint import COMPLETE, _is_remote, _local_path, find_latest_complete

__all__ = ["ExportFailed", "consolidated_state_dict", "export_checkpoint"]


class ExportFailed(RuntimeError):
    pass


def _locate(checkpoint: str, tag: str | None, storage_options: dict | None) -> tuple[str, str]:
    """(root, tag) for a checkpoint dir or a tag dir."""
    checkpoint = checkpoint.rstrip("/")
    if tag:
        return checkpoint, tag
    fs, path = get_fs(checkpoint, storage_options)
    if fs.exists(join(path, COMPLETE)):
        root, _, name = checkpoint.rpartition("/")
        return root or ".", name
    if not fs.exists(path):
        raise ExportFailed(f"checkpoint not found: {checkpoint}")
    found = find_latest_complete(checkpoint, storage_options)
    if found is None:
        raise ExportFailed(f"no complete checkpoint (a tag dir with {COMPLETE}) under {checkpoint}")
    return checkpoint, found[0]


def consolidated_state_dict(root: Path, tag: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Full fp32 model state dict and the checkpoint's client state (local checkpoint)."""
    tag_dir = root / tag
    meta = json.loads((tag_dir / COMPLETE).read_text())
    model_file = tag_dir / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise ExportFailed(
            f"{tag_dir} holds no DeepSpeed model states (mp_rank_00_model_states.pt)"
        )
    # Our own DeepSpeed checkpoint (it pickles its config objects): weights_only=False is needed.
    client = torch.load(model_file, map_location="cpu", weights_only=False)
    if meta.get("zero_stage", 0) > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    else:
        state = client["module"]
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    return state, client


def export_checkpoint(
    checkpoint: str, out: str, *, tag: str | None = None, storage_options: dict | None = None
) -> tuple[str, int]:
    from avts_dist.models import AVTSModel, export_payload, save_exported, write_model_card

    try:
        root, tag = _locate(checkpoint, tag, storage_options)
        with tempfile.TemporaryDirectory(prefix="avts-export-") as tmp:
            if _is_remote(root):
                fs, rpath = get_fs(root, storage_options)
                fs.get(join(rpath, tag) + "/", str(Path(tmp) / tag), recursive=True)
                local_root = Path(tmp)
            else:
                local_root = _local_path(root)
            if not (local_root / tag / COMPLETE).is_file():
                raise ExportFailed(f"{root}/{tag} is not a complete checkpoint (no {COMPLETE})")
            state, client = consolidated_state_dict(local_root, tag)
    except (StorageError, OSError) as exc:
        raise ExportFailed(f"cannot read checkpoint {checkpoint}: {exc}") from None
    try:
        model_cfg = config_from_dict(client["config"]["model"], schema=ModelConfig)
    except (KeyError, ConfigError) as exc:
        raise ExportFailed(f"checkpoint {root}/{tag} has no usable model config: {exc}") from None
    model = AVTSModel(model_cfg)  # not build_model: model.init_from is in the checkpoint already
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportFailed(
            f"checkpoint weights do not fit model config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    step = int(client.get("trainer", {}).get("step", 0))
    payload = export_payload(model, model_cfg, source_checkpoint=f"{root}/{tag}", step=step)
    save_exported(payload, out, storage_options)
    write_model_card(
        payload, out, storage_options=storage_options, config=client["config"],
        trainer_state=client.get("trainer"),
    )  # fmt: skip
    return out, step
