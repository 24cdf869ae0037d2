"""The weights an evaluation starts from: an exported ``model.pt`` or a training checkpoint
(exported on the fly with :func:`avts_dist.export.consolidate.export_checkpoint`), plus the
pretraining run it came from (run dir, MLflow run id). The nets are built and loaded by
:func:`avts_dist.export.pretrained_part`, the library's one weights loader."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from avts_dist.config import Config, ModelConfig
from avts_dist.export import (
    ExportError,
    load_exported,
    model_config_from_export,
    pretrained_part,
    require_audio,
)
from avts_dist.storage import is_remote
from eval.registry import EvalError

__all__ = ["ARCH_FIELDS", "Pretrained", "check_model_match", "resolve_pretrained"]

ARCH_FIELDS = (
    "video_arch",
    "video_width",
    "video_layers",
    "audio_arch",
    "audio_width",
    "embed_dim",
)


@dataclass
class Pretrained:
    # The checkpoint as given (exported .pt, checkpoint dir, or URL): what runs are tagged with.
    checkpoint: str
    payload: dict[str, Any]
    model_cfg: ModelConfig
    run_dir: Path | None
    mlflow_run_id: str

    def video_net(self, pretrained: bool = True, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        return self._part("video", pretrained)

    def require_audio(self, job: str) -> None:
        """EvalError (one line, exit 2) when ``job`` needs an audio net this export lacks."""
        try:
            require_audio(self.payload, f"{job} needs an audio net: checkpoint {self.checkpoint}")
        except ExportError as exc:
            raise EvalError(str(exc)) from None

    def audio_net(self, pretrained: bool = True, seed: int | None = None) -> torch.nn.Module:
        if seed is not None:
            torch.manual_seed(seed)
        if pretrained:
            self.require_audio("audio")
        return self._part("audio", pretrained)

    def model(self, pretrained: bool = True, seed: int | None = None) -> torch.nn.Module:
        """The whole model; ``pretrained=False``: the same architecture from a random init
        (never ``model.init_from``'s weights)."""
        if seed is not None:
            torch.manual_seed(seed)
        if pretrained:
            self.require_audio("model")
        return self._part("model", pretrained)

    def _part(self, part: str, pretrained: bool) -> torch.nn.Module:
        try:
            return pretrained_part(
                self.payload, part, source=f"checkpoint {self.checkpoint}", load=pretrained
            )
        except ExportError as exc:
            raise EvalError(str(exc)) from None


def _find_run_dir(start: Path) -> Path | None:
    """The run dir holds ``mlflow_run_id`` / ``config.yaml``; checkpoints sit below it."""
    candidates = [start, *start.parents][:5]
    for marker in ("mlflow_run_id", "config.yaml"):
        for p in candidates:
            if (p / marker).is_file():
                return p
    return None


def _is_export_file(checkpoint: str) -> bool:
    if is_remote(checkpoint):
        return checkpoint.endswith(".pt")
    return Path(checkpoint.removeprefix("file://")).is_file()


def _export_to_memory(checkpoint: str) -> dict[str, Any]:
    """The export payload of a checkpoint dir or tag dir, through a temporary file."""
    # DeepSpeed names its accelerator on stdout when first imported unless told which one to
    # use; stdout belongs to `avts eval` (its --json). This is the choice it would make itself.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    # Deferred: the training package (DeepSpeed) takes seconds to import and is only needed to
    # export a checkpoint dir, not to read an exported .pt.
    from avts_dist.export.consolidate import ExportFailed, export_checkpoint

    with tempfile.TemporaryDirectory(prefix="avts-eval-") as tmp:
        try:
            out, _ = export_checkpoint(checkpoint, str(Path(tmp) / "model.pt"))
        except ExportFailed as exc:
            raise EvalError(str(exc)) from None
        return _load_exported(out)


def _load_exported(path: str) -> dict[str, Any]:
    try:
        return load_exported(path)
    except ExportError as exc:
        raise EvalError(str(exc)) from None


def resolve_pretrained(checkpoint: str) -> Pretrained:
    """Resolves ``--checkpoint`` (an exported ``.pt``, or a checkpoint dir or tag dir, local or
    remote), its run dir and the pretraining run's MLflow id."""
    if not checkpoint:
        raise EvalError("no checkpoint: pass --checkpoint <checkpoint dir or exported .pt>")
    if _is_export_file(checkpoint):
        payload = _load_exported(checkpoint)
    else:
        payload = _export_to_memory(checkpoint)
    try:
        model_cfg = model_config_from_export(payload)
    except ExportError as exc:
        raise EvalError(str(exc)) from None
    run_dir = None
    local = None if is_remote(checkpoint) else checkpoint.removeprefix("file://")
    for start in (local, payload.get("source_checkpoint")):
        if start and not is_remote(str(start)):
            run_dir = _find_run_dir(Path(str(start)).resolve())
            if run_dir is not None:
                break
    run_id = ""
    if run_dir is not None and (run_dir / "mlflow_run_id").exists():
        run_id = (run_dir / "mlflow_run_id").read_text().strip()
    return Pretrained(checkpoint, payload, model_cfg, run_dir, run_id)


def check_model_match(pre: Pretrained, cfg: Config, explicit_model_keys: set[str]) -> None:
    """Model keys the user set explicitly (overrides, --config) must equal the checkpoint's."""
    mismatched = [
        f"model.{k}={getattr(cfg.model, k)!r} but the checkpoint has {getattr(pre.model_cfg, k)!r}"
        for k in ARCH_FIELDS
        if k in explicit_model_keys and getattr(cfg.model, k) != getattr(pre.model_cfg, k)
    ]
    if mismatched:
        raise EvalError(
            f"checkpoint {pre.checkpoint} does not match the config: {'; '.join(mismatched)}"
        )
