"""Loading: defaults -> YAML (``base:`` / ``includes:``) -> ``key=value`` overrides, strict,
with the rename table for keys that moved; and rebuilding a saved config."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, get_type_hints

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from avts_dist.config.common import REPO_ROOT, ConfigError
from avts_dist.config.handoff import restore_secrets
from avts_dist.config.tree import Config

__all__ = [
    "RENAMED_KEYS",
    "config_from_dict",
    "load_config",
    "read_yaml_layers",
    "resolve_config_path",
]

log = logging.getLogger("avts.config")


# Keys renamed since configs were first saved (old -> new; None: removed, it did nothing).
# Saved run configs (<run.dir>/config.yaml, read by `avts eval`) and users' overrides keep
# working; a warning names the new key, and resolved configs are written with the new names.
RENAMED_KEYS: dict[str, str | None] = {
    "eval.suite": None,
    "eval.sync_split": "eval.sync.split",
    "eval.sync_max_clips": "eval.sync.max_clips",
    "eval.sync_threshold": "eval.sync.threshold",
    "eval.sync_offsets": "eval.sync.offsets",
    "eval.epochs": "eval.finetune.epochs",
    "eval.lr": "eval.finetune.lr",
    "eval.weight_decay": "eval.finetune.weight_decay",
    "eval.clips_per_video": "eval.finetune.clips_per_video",
    "eval.scratch_baseline": "eval.finetune.scratch_baseline",
    "eval.feature_layer": "eval.probe.feature_layer",
    "eval.classifier": "eval.probe.classifier",
    "eval.svm_c": "eval.probe.c",
    "eval.audio_windows": "eval.probe.windows",
}


def resolve_config_path(path: str | Path) -> Path:
    """A config path as given, or relative to the repository (so `configs/...` works anywhere)."""
    p = Path(path)
    if p.exists():
        return p
    alt = REPO_ROOT / p
    if alt.exists():
        return alt
    raise ConfigError(f"config file not found: {path}")


def read_yaml_layers(path: Path, seen: tuple[Path, ...] = ()) -> list[dict[str, Any]]:
    """The YAML layers of ``path`` in merge order: its ``base:`` and ``includes:`` (resolved
    relative to it, recursively) first, the file itself last; raw mappings, not yet renamed."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config include cycle: {' -> '.join(str(p) for p in (*seen, path))}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    parents: list[str] = []
    base = raw.pop("base", None)
    if base:
        parents.append(base)
    includes = raw.pop("includes", None) or []
    if isinstance(includes, str):
        includes = [includes]
    parents.extend(includes)
    layers: list[dict[str, Any]] = []
    for parent in parents:
        parent_path = (path.parent / parent) if not Path(parent).is_absolute() else Path(parent)
        if not parent_path.exists():
            raise ConfigError(f"{path}: included file not found: {parent}")
        layers.extend(read_yaml_layers(parent_path, (*seen, path)))
    layers.append(raw)
    return layers


def _renamed_key(key: str) -> str | None:
    """The current name of ``key`` (None: a removed key), with a warning for an old name."""
    if key not in RENAMED_KEYS:
        return key
    new = RENAMED_KEYS[key]
    log.warning(
        "config key '%s' %s", key, f"is now '{new}'" if new else "was removed (it had no effect)"
    )
    return new


def _rename_keys(tree: dict[str, Any]) -> dict[str, Any]:
    """A YAML layer or saved config with old key names moved to their new places."""
    tree = {k: dict(v) if isinstance(v, dict) else v for k, v in tree.items()}
    for old in RENAMED_KEYS:
        section, _, leaf = old.partition(".")
        node = tree.get(section)
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node.pop(leaf)
        new = _renamed_key(old)
        if new:
            *parents, last = new.split(".")[1:]
            for name in parents:
                node = node.setdefault(name, {})
            node[last] = value
    return tree


def _rename_overrides(overrides: list[str]) -> list[str]:
    out = []
    for item in overrides:
        key, _, value = item.partition("=")
        new = _renamed_key(key)
        if new:
            out.append(f"{new}={value}")
    return out


def _key_paths(schema: type, prefix: str = "") -> list[str]:
    """Every key of a config dataclass, dotted (``deepspeed.grad_accum_steps``), sections too."""
    paths = []
    hints = get_type_hints(schema)
    for f in dataclasses.fields(schema):
        path = f"{prefix}{f.name}"
        paths.append(path)
        if dataclasses.is_dataclass(hints.get(f.name)):
            paths += _key_paths(hints[f.name], f"{path}.")
    return paths


def _elsewhere(key: str) -> str:
    """`` Did you mean: 'deepspeed.grad_accum_steps'?`` when an unknown key's last name is a key
    of another section (``train.grad_accum_steps``), else ``""`` (OmegaConf's own hint only looks
    within the section)."""
    leaf = key.rsplit(".", 1)[-1]
    places = [p for p in _key_paths(Config) if p.rsplit(".", 1)[-1] == leaf and p != key]
    if not places:
        return ""
    return " Did you mean: " + " or ".join(f"'{p}'" for p in places) + "?"


def _omegaconf_message(exc: OmegaConfBaseException, schema: type = Config) -> str:
    key = getattr(exc, "full_key", None)
    # A section merged on its own (e.g. a checkpoint's model config) names its keys as the
    # whole tree does: model.video_arch, not video_arch.
    section = {hint: name for name, hint in get_type_hints(Config).items()}.get(schema)
    if key and section:
        key = f"{section}.{key}"
    msg = str(exc).split("\n")[0]
    if key and isinstance(exc, ConfigKeyError) and "Did you mean" not in msg:
        hint = _elsewhere(key)
        msg = msg.rstrip(".") + "." + hint if hint else msg
    return f"config key '{key}': {msg}" if key else msg


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    schema: type = Config,
) -> Any:
    """Defaults -> YAML (with base/includes) -> dot-list overrides, strict; returns dataclasses."""
    merged: DictConfig = OmegaConf.structured(schema)
    layers = read_yaml_layers(resolve_config_path(path)) if path else []
    overrides = list(overrides or [])
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
    layers = [_rename_keys(layer) for layer in layers]
    overrides = _rename_overrides(overrides)
    try:
        for layer in layers:
            merged = OmegaConf.merge(merged, layer)
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(overrides))
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(_omegaconf_message(exc, schema)) from None
    return obj.fill_derived() if hasattr(obj, "fill_derived") else obj


def config_from_dict(data: dict[str, Any], schema: type = Config) -> Any:
    """Rebuilds a config saved with :func:`config_to_dict` (e.g. from a checkpoint)."""
    try:
        return restore_secrets(
            OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), _rename_keys(data)))
        )
    except OmegaConfBaseException as exc:
        raise ConfigError(_omegaconf_message(exc, schema)) from None
