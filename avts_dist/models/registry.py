"""``build_model``: the model of a run, by name, from a registry of builders.

A name maps to a builder ``ModelConfig -> nn.Module`` (torchtitan's model registry, open_clip's
factory). A run's name comes from its config (:func:`model_name`): ``model.arch``
(``two_stream``, ``early_fusion``), or ``video_ssl`` when ``train.objective=video_ssl``.
:func:`register_model` adds a model without touching this file. Builders give a fresh
architecture only; weights (``model.init_from``, an export) are loaded by ``avts_dist.export``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from avts_dist.config import ModelConfig
from avts_dist.models.avts import AVTSModel
from avts_dist.models.early_fusion import EarlyFusionModel
from avts_dist.models.video_ssl import VideoSSLModel

__all__ = ["ModelBuilder", "build_model", "model_name", "model_names", "register_model"]

ModelBuilder = Callable[[ModelConfig], nn.Module]

_BUILDERS: dict[str, ModelBuilder] = {
    "two_stream": AVTSModel,
    "early_fusion": EarlyFusionModel,
    "video_ssl": VideoSSLModel,
}


def register_model(name: str, builder: ModelBuilder) -> ModelBuilder:
    """Adds ``builder`` under ``name``; a name is registered once."""
    if name in _BUILDERS:
        raise ValueError(f"model {name!r} is already registered ({_BUILDERS[name].__name__})")
    _BUILDERS[name] = builder
    return builder


def model_names() -> list[str]:
    return sorted(_BUILDERS)


def model_name(cfg: ModelConfig, objective: str = "avts") -> str:
    """The registry name of a run: ``video_ssl`` for that objective (``train.objective``) on a
    ``two_stream`` config (the only arch the config allows with it), else ``model.arch``."""
    return "video_ssl" if objective == "video_ssl" and cfg.arch == "two_stream" else cfg.arch


def build_model(cfg: ModelConfig, objective: str = "avts") -> nn.Module:
    """The freshly initialised model of ``cfg`` and ``objective`` (see :func:`model_name`)."""
    name = model_name(cfg, objective)
    builder = _BUILDERS.get(name)
    if builder is None:
        raise ValueError(f"unknown model {name!r}; registered: {model_names()}")
    return builder(cfg)
