"""What every schema module shares: the error that names its key, and the checks beside it."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Literal, NoReturn, get_args, get_origin, get_type_hints

__all__ = [
    "NEGATIVE_KINDS",
    "REPO_ROOT",
    "ConfigError",
    "check_choices",
    "check_mix",
    "deep_merge",
    "fail",
]

NEGATIVE_KINDS = ("easy", "hard", "superhard")
REPO_ROOT = Path(__file__).resolve().parents[2]


class ConfigError(ValueError):
    """A config problem, with the full key it concerns in the message."""


def fail(key: str, msg: str) -> NoReturn:
    """Raises :class:`ConfigError` for ``key`` (the full dotted key, e.g. ``data.fps``)."""
    raise ConfigError(f"config key '{key}': {msg}")


@functools.cache
def _literal_fields(cls: type) -> dict[str, tuple]:
    hints = get_type_hints(cls)
    return {n: get_args(h) for n, h in hints.items() if get_origin(h) is Literal}


def check_choices(obj: Any, section: str) -> None:
    """Literal-typed fields hold one of their values. OmegaConf checks them when it merges a
    layer; this covers a dataclass built directly in code."""
    for name, choices in _literal_fields(type(obj)).items():
        if getattr(obj, name) not in choices:
            fail(f"{section}.{name}", f"must be one of {list(choices)}, got {getattr(obj, name)!r}")


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``; nested mappings merge key by key."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def check_mix(key: str, mix: dict[str, float]) -> None:
    unknown = set(mix) - set(NEGATIVE_KINDS)
    if unknown:
        fail(key, f"unknown negative kind(s) {sorted(unknown)}; expected {list(NEGATIVE_KINDS)}")
    if any(v < 0 for v in mix.values()):
        fail(key, "negative-mix weights must be >= 0")
    if sum(mix.values()) <= 0:
        fail(key, "negative-mix weights must not all be zero")
