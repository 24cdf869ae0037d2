"""The secrets of a config, handed to launched jobs through their environment.

Redaction (:mod:`avts_dist.secrets`) keeps credentials out of every file; ``avts launch`` still
has to give them to its jobs. It does so in ``$AVTS_CONFIG_SECRETS`` while they are submitted,
and a job's :func:`restore_secrets` puts them back where its config holds placeholders.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

from avts_dist.config.common import ConfigError
from avts_dist.config.save import config_to_dict, redacted_config_dict
from avts_dist.secrets import REDACTED

__all__ = ["SECRETS_ENV", "config_secrets", "restore_secrets", "secrets_in_environment"]

# `avts launch` hands what redaction hides to its jobs in their environment (SLURM keeps a job's
# environment across requeues), never in a file: the job folder holds the redacted config.
SECRETS_ENV = "AVTS_CONFIG_SECRETS"


def config_secrets(cfg: Any) -> dict[str, Any]:
    """``{"data.storage_options.secret": value, ...}``: every value that redaction hides."""
    out: dict[str, Any] = {}

    def walk(raw: dict, shown: dict, prefix: str) -> None:
        for key, value in raw.items():
            seen = shown.get(key)
            if isinstance(value, dict) and isinstance(seen, dict):
                walk(value, seen, f"{prefix}{key}.")
            elif isinstance(seen, str) and REDACTED in seen and value != seen:
                out[f"{prefix}{key}"] = value

    walk(config_to_dict(cfg), redacted_config_dict(cfg), "")
    return out


@contextlib.contextmanager
def secrets_in_environment(cfg: Any):
    """``$AVTS_CONFIG_SECRETS`` holds ``cfg``'s secrets while jobs are submitted (they inherit
    it), and is unset again afterwards."""
    secrets = config_secrets(cfg)
    previous = os.environ.get(SECRETS_ENV)
    if secrets:
        os.environ[SECRETS_ENV] = json.dumps(secrets)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(SECRETS_ENV, None)
        else:
            os.environ[SECRETS_ENV] = previous


def restore_secrets(cfg: Any, secrets: dict[str, Any] | None = None) -> Any:
    """Puts ``secrets`` (default: the JSON in ``$AVTS_CONFIG_SECRETS``) back where ``cfg`` holds
    a redaction placeholder; values the user gave again are kept."""
    if secrets is None:
        text = os.environ.get(SECRETS_ENV, "")
        try:
            secrets = json.loads(text) if text else {}
        except json.JSONDecodeError:
            raise ConfigError(f"${SECRETS_ENV} is not valid JSON") from None
    for path, value in secrets.items():
        *parents, leaf = path.split(".")
        node: Any = cfg
        for name in parents:
            node = node.get(name) if isinstance(node, dict) else getattr(node, name, None)
        if isinstance(node, dict):
            if isinstance(node.get(leaf), str) and REDACTED in node[leaf]:
                node[leaf] = value
        elif node is not None and REDACTED in str(getattr(node, leaf, "")):
            setattr(node, leaf, value)
    return cfg
