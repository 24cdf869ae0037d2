"""Writing: the resolved config as a dict, redacted, as YAML, and as flat MLflow params.

The MLflow flattening lives here, beside :func:`save_config`: both write the same redacted
view of the tree, one as a file, the other as ``{"data.fps": 8.0, ...}`` params.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from avts_dist.secrets import redact

__all__ = [
    "config_to_dict",
    "config_to_yaml",
    "flatten_config",
    "redacted_config_dict",
    "save_config",
]


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The whole config, credentials included: for passing it on in memory, never to write."""
    return dataclasses.asdict(cfg)


def redacted_config_dict(cfg: Any) -> dict[str, Any]:
    """The config as it may be written anywhere (files, MLflow, checkpoints, logs): storage
    options keep only the values of harmless keys (:func:`avts_dist.secrets.redact`)."""
    return redact(config_to_dict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg))


def config_to_yaml(cfg: Any) -> str:
    """The redacted config as YAML (what is saved and printed)."""
    return yaml.safe_dump(redacted_config_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Writes the resolved config, redacted, as YAML (atomically) and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(config_to_yaml(cfg))
    tmp.replace(path)
    return path


def flatten_config(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"data.fps": 8.0, "curriculum.stages": "[...]", ...}`` for MLflow params, redacted.

    Nested mappings are flattened with dots; lists become their JSON text.
    """
    # Nested calls get already-redacted mappings; a sub-config (``cfg.eval``) is redacted too.
    data = redacted_config_dict(cfg) if dataclasses.is_dataclass(cfg) or not prefix else cfg
    out: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_config(value, prefix=f"{full}."))
        elif isinstance(value, (list, dict)):
            out[full] = json.dumps(value)
        else:
            out[full] = value
    return out
