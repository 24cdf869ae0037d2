"""Cluster profiles: named sets of ``launch.*`` options in ``configs/cluster/<name>.yaml``.

A profile is a flat mapping of :class:`avts_dist.config.LaunchConfig` fields::

    partition: gpu
    gpus_per_node: 8
    cpus_per_task: 10
    time: "72:00:00"

Precedence (lowest first): dataclass defaults -> the experiment YAML's ``launch:`` section ->
the profile -> ``launch.x=...`` overrides -> explicit ``avts launch`` flags.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from avts_dist.config import (
    REPO_ROOT,
    Config,
    ConfigError,
    LaunchConfig,
    config_from_dict,
    config_to_dict,
    load_config,
)

PROFILE_DIR = REPO_ROOT / "configs" / "cluster"


def profile_path(name: str) -> Path:
    """A profile name (``local``) or a path to a profile YAML."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    candidate = PROFILE_DIR / f"{name}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(q.stem for q in PROFILE_DIR.glob("*.yaml"))
    raise ConfigError(f"unknown cluster profile {name!r}; known profiles: {', '.join(known)}")


def load_profile(name: str) -> dict[str, Any]:
    """The profile's fields, checked against LaunchConfig (unknown keys name the file)."""
    path = profile_path(name)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a profile is a mapping of launch.* keys")
    fields = {f.name for f in dataclasses.fields(LaunchConfig)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ConfigError(
            f"{path}: unknown key(s) {unknown}; a profile sets launch.* keys: {sorted(fields)}"
        )
    return raw


def profile_overrides(name: str) -> list[str]:
    """The profile as ``launch.key=value`` dot-list overrides for :func:`load_config`."""
    out = []
    for key, value in load_profile(name).items():
        # YAML flow style keeps lists and quoted strings intact through OmegaConf's dot-list parser.
        text = yaml.safe_dump(value, default_flow_style=True).strip()
        if text.endswith("\n...") or text.endswith("..."):
            text = text.rsplit("\n", 1)[0].strip()
        out.append(f"launch.{key}={text}")
    return out


def resolve_launch_config(
    config: str | None,
    overrides: list[str],
    *,
    profile: str | None = None,
    flags: dict[str, Any] | None = None,
) -> Config:
    """The config with its cluster options layered (lowest first): the YAML's ``launch:``
    section, the profile (``profile`` or ``launch.profile``), ``overrides``, then ``flags``
    (``LaunchConfig`` field -> value, the explicit ``avts launch`` options). Every layer is
    checked by the dataclasses."""
    base = load_config(config, overrides)
    profile = profile or base.launch.profile
    cfg = load_config(config, [*profile_overrides(profile), *overrides]) if profile else base
    data = config_to_dict(cfg)
    data["launch"].update(flags or {})
    if profile:
        data["launch"]["profile"] = profile
    return config_from_dict(data)
