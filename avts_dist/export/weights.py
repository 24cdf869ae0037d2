"""Weights into models: the one weights loader, ``load_pretrained`` and ``model.init_from``.

- :func:`load_weights` loads a state dict into a module, strictly; a mismatch is one
  :class:`ExportError` line naming the first differing keys and shapes.
- :func:`pretrained_part` builds a part of an export (``video``, ``audio`` or the whole
  ``model``) from its ``model_config`` and loads its weights; :func:`load_pretrained` does the
  same from a path or fsspec URL. Evaluation (``eval.pretrained``) uses the former.
- :func:`init_video_from` starts a video net from a torchvision-layout state dict
  (``model.init_from``); :func:`build_initial_model` is the model a pretraining starts from.

``model.init_from`` takes the video nets' torchvision module tree (see ``models/video.py``), so
torchvision's Kinetics-400 weights load as they are::

    torch.save(torchvision.models.video.mc3_18(weights="KINETICS400_V1").state_dict(), "k400.pt")
    avts train --config ... model.video_arch=mc3_18 model.init_from=k400.pt

The file may hold the state dict itself, ``{"state_dict": ...}``, or an ``avts export`` (its
``video`` part). The classifier (``fc.*``) is dropped: pretraining uses a headless backbone.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from avts_dist.config import ConfigError, ModelConfig
from avts_dist.export.format import (
    ExportError,
    load_exported,
    model_config_from_export,
    read_torch_file,
    require_audio,
)
from avts_dist.models import build_audio_net, build_model, build_video_net

__all__ = [
    "PARTS",
    "build_initial_model",
    "init_video_from",
    "load_pretrained",
    "load_weights",
    "pretrained_part",
    "state_dict_mismatches",
]

PARTS = ("video", "audio", "model")
INIT_KEY = "model.init_from"
# Mismatches named in an error (the rest are counted).
NUM_NAMED = 3


def state_dict_mismatches(
    module: nn.Module, state: dict[str, torch.Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """(missing keys, unexpected keys, 'key: file [..] vs model [..]' shape mismatches)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: file {list(state[k].shape)} vs model {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    return missing, unexpected, shapes


def _describe(kind: str, items: list[str]) -> str:
    more = f" (+{len(items) - NUM_NAMED} more)" if len(items) > NUM_NAMED else ""
    return f"{len(items)} {kind}: {', '.join(items[:NUM_NAMED])}{more}"


def _layout(module: nn.Module) -> str:
    """``mc3_18, width 64, layers [2, 2, 2, 2]`` for a backbone, else the class name."""
    if not hasattr(module, "arch"):
        return type(module).__name__
    layers = f", layers {list(module.layers)}" if hasattr(module, "layers") else ""
    return f"{module.arch}, width {module.width}{layers}"


def load_weights(
    module: nn.Module, state: dict[str, torch.Tensor], what: str, source: str
) -> nn.Module:
    """Loads ``state`` (the ``what`` weights of ``source``) into ``module`` with ``strict=True``;
    ExportError in one line when keys or shapes differ."""
    missing, unexpected, shapes = state_dict_mismatches(module, state)
    if missing or unexpected or shapes:
        found = "; ".join(
            _describe(kind, items)
            for kind, items in (
                ("shape mismatch(es)", shapes),
                ("key(s) missing from the file", missing),
                ("unexpected key(s) in the file", unexpected),
            )
            if items
        )
        raise ExportError(
            f"{source} does not match the model config: its {what} weights do not match the "
            f"net it gives ({_layout(module)}): {found}"
        )
    module.load_state_dict(state, strict=True)
    return module


def pretrained_part(
    payload: dict[str, Any],
    part: str = "video",
    *,
    source: str = "the export",
    load: bool = True,
    **overrides: Any,
) -> nn.Module:
    """``part`` of an export payload, built from its ``model_config`` (``overrides`` change
    runtime options such as ``activation_checkpointing``, never the architecture) with its
    weights loaded; ``load=False``: the same architecture at a fresh initialisation."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {list(PARTS)}, got {part!r}")
    cfg = dataclasses.replace(model_config_from_export(payload), init_from="", **overrides)
    if part != "video" and load:
        require_audio(payload, source)
    if part == "audio" and load and cfg.arch == "early_fusion":
        raise ExportError(
            f"{source} is model.arch=early_fusion: its audio branch feeds the shared video "
            "trunk and is not an audio network; audio-only jobs need a two_stream checkpoint"
        )
    if part == "video":
        net = build_video_net(cfg)
        parts = {"video": net}
    elif part == "audio":
        net = build_audio_net(cfg)
        parts = {"audio": net}
    else:
        net = build_model(cfg)
        parts = {"video": net.video, "audio": net.audio, "heads": net.heads}
    if load:
        for key, module in parts.items():
            load_weights(module, payload[key], key, source)
    return net


def load_pretrained(
    path_or_url: str,
    part: str = "video",
    storage_options: dict | None = None,
    **overrides: Any,
) -> nn.Module:
    """A pretrained subnetwork from an ``avts export`` file (local path or fsspec URL).

    ``part="video"``: the headless video net, ``video_BCTHW`` -> pooled features [B, C];
    ``"audio"``: the audio net, ``logmel_B1FT`` -> [B, C]; ``"model"``: the whole model with its
    heads (two-stream or early fusion). A plain ``nn.Module`` in training mode (call ``.eval()``
    to extract features); ``overrides`` set runtime options such as ``activation_checkpointing``.
    """
    if part not in PARTS:
        raise ValueError(f"part must be one of {list(PARTS)}, got {part!r}")
    payload = load_exported(path_or_url, storage_options)
    return pretrained_part(payload, part, source=path_or_url, **overrides)


def _read_video_state(url: str, storage_options: dict[str, Any] | None) -> dict:
    obj = read_torch_file(url, storage_options, expected="a torch state dict")
    if isinstance(obj, dict) and "format_version" in obj and isinstance(obj.get("video"), dict):
        obj = obj["video"]  # an avts export
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ExportError(f"{url} holds no state dict of tensors")
    return obj


def init_video_from(
    net: nn.Module, url: str, storage_options: dict[str, Any] | None = None
) -> nn.Module:
    """Loads the torchvision-layout weights in ``url`` into the video net ``net`` (in place);
    ConfigError naming ``model.init_from``."""
    try:
        state = _read_video_state(url, storage_options)
        if getattr(net, "fc", None) is None:
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        return load_weights(net, state, "video", url)
    except ExportError as exc:
        raise ConfigError(f"config key '{INIT_KEY}': {exc}") from None


def build_initial_model(cfg: ModelConfig, objective: str = "avts") -> nn.Module:
    """The model a pretraining starts from: ``build_model``, its video net from
    ``model.init_from`` when set."""
    model = build_model(cfg, objective)
    if cfg.init_from:
        init_video_from(model.video, cfg.init_from)
    return model
