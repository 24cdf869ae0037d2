"""``model.init_from``: start the video net from a torchvision-layout state dict.

The video nets have torchvision's module tree (see ``video.py``), so torchvision's Kinetics-400
weights load as they are::

    torch.save(torchvision.models.video.mc3_18(weights="KINETICS400_V1").state_dict(), "k400.pt")
    avts train --config ... model.video_arch=mc3_18 model.init_from=k400.pt

The file is read with ``torch.load(weights_only=True)`` from a local path or an fsspec URL. It may
hold the state dict itself, ``{"state_dict": ...}``, or an ``avts export`` (its ``video`` part).
The classifier (``fc.*``) is dropped: pretraining uses a headless backbone. Every other key and
shape must match the configured net; the error names the first mismatches.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from torch import nn

from avts_dist.config import ConfigError
from avts_dist.storage import StorageError, get_fs

__all__ = ["init_video_from", "read_state_dict", "state_dict_mismatches"]

KEY = "model.init_from"
# Mismatches named in an error (the rest are counted).
NUM_NAMED = 3


def read_state_dict(url: str, storage_options: dict[str, Any] | None = None) -> dict:
    """The tensors of a state-dict file; raises ConfigError naming ``model.init_from``."""
    try:
        fs, path = get_fs(url, storage_options)
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise ConfigError(f"config key '{KEY}': file not found: {url}") from None
    except (StorageError, OSError) as exc:
        raise ConfigError(f"config key '{KEY}': cannot read {url}: {exc}") from None
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip or unsupported-global errors, many types
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"config key '{KEY}': {url} is not a torch state dict: {msg}") from None
    if isinstance(obj, dict) and "format_version" in obj and isinstance(obj.get("video"), dict):
        obj = obj["video"]  # an avts export
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"config key '{KEY}': {url} holds no state dict of tensors")
    return obj


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


def init_video_from(
    net: nn.Module, url: str, storage_options: dict[str, Any] | None = None
) -> nn.Module:
    """Loads the torchvision-layout weights in ``url`` into the video net ``net`` (in place)."""
    state = read_state_dict(url, storage_options)
    if getattr(net, "fc", None) is None:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected, shapes = state_dict_mismatches(net, state)
    if missing or unexpected or shapes:
        what = "; ".join(
            _describe(kind, items)
            for kind, items in (
                ("shape mismatch(es)", shapes),
                ("key(s) missing from the file", missing),
                ("unexpected key(s) in the file", unexpected),
            )
            if items
        )
        arch = getattr(net, "arch", type(net).__name__)
        layout = f"{arch}, width {getattr(net, 'width', '?')}, layers {getattr(net, 'layers', '?')}"
        raise ConfigError(
            f"config key '{KEY}': {url} does not fit the video net ({layout}): {what}"
        )
    net.load_state_dict(state, strict=True)
    return net
