"""The typed config tree: one dataclass per component.

Layers merge in order, strictly (lingua ``args.py``, torchtitan ``Trainer.Config``):

1. the dataclass defaults;
2. a YAML file under ``configs/`` (it may name ``base: other.yaml`` or ``includes: [...]``,
   resolved relative to the file, merged before the file itself);
3. ``key=value`` dot-list overrides from the command line.

An unknown key, a value of the wrong type or an impossible combination raises
:class:`ConfigError` whose message names the full key (``data.fps``).
Each component receives only its own sub-config: ``build_loader(cfg.data, rank=..., ...)``.

The package, by module:

- ``common``: :class:`ConfigError`, :func:`fail` (the error that names its key), shared checks;
- schemas by topic: ``data``, ``model``, ``loss``, ``curriculum``, ``train`` (run, optim,
  deepspeed, checkpoint, train), ``tracking``, ``launch``, ``eval``; the whole tree with the
  checks across sections in ``tree`` (:class:`Config`);
- ``load``: layering, overrides, the rename table, rebuilding a saved config;
- ``save``: the redacted config as a dict, YAML, a file and flat MLflow params;
- ``handoff``: the secrets ``avts launch`` hands its jobs through their environment.

Redaction itself is :mod:`avts_dist.secrets`, a leaf that this package and
:mod:`avts_dist.storage` both import; this package imports nothing from storage.
"""

from __future__ import annotations

from omegaconf import MISSING

from avts_dist.config.common import (
    NEGATIVE_KINDS,
    REPO_ROOT,
    ConfigError,
    deep_merge,
    fail,
)
from avts_dist.config.curriculum import CurriculumConfig, CurriculumStage
from avts_dist.config.data import VIDEO_DECODERS, DataConfig
from avts_dist.config.eval import (
    LOWLABEL_RECIPES,
    EvalConfig,
    FinetuneConfig,
    LinearProbeConfig,
    LowLabelConfig,
    SyncEvalConfig,
)
from avts_dist.config.handoff import (
    SECRETS_ENV,
    config_secrets,
    restore_secrets,
    secrets_in_environment,
)
from avts_dist.config.launch import LaunchConfig, SlurmSignal
from avts_dist.config.load import (
    RENAMED_KEYS,
    config_from_dict,
    load_config,
    read_yaml_layers,
    resolve_config_path,
)
from avts_dist.config.loss import LossConfig
from avts_dist.config.model import ModelConfig
from avts_dist.config.save import (
    config_to_dict,
    config_to_yaml,
    flatten_config,
    redacted_config_dict,
    save_config,
)
from avts_dist.config.tracking import TrackingConfig
from avts_dist.config.train import (
    CheckpointConfig,
    DeepSpeedConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
)
from avts_dist.config.tree import Config

__all__ = [
    "LOWLABEL_RECIPES",
    "MISSING",
    "NEGATIVE_KINDS",
    "RENAMED_KEYS",
    "REPO_ROOT",
    "SECRETS_ENV",
    "VIDEO_DECODERS",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "CurriculumConfig",
    "CurriculumStage",
    "DataConfig",
    "DeepSpeedConfig",
    "EvalConfig",
    "FinetuneConfig",
    "LaunchConfig",
    "LinearProbeConfig",
    "LossConfig",
    "LowLabelConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "SlurmSignal",
    "SyncEvalConfig",
    "TrackingConfig",
    "TrainConfig",
    "config_from_dict",
    "config_secrets",
    "config_to_dict",
    "config_to_yaml",
    "deep_merge",
    "fail",
    "flatten_config",
    "load_config",
    "read_yaml_layers",
    "redacted_config_dict",
    "resolve_config_path",
    "restore_secrets",
    "save_config",
    "secrets_in_environment",
]
