"""Secrets and their redaction: what may be written anywhere, and what never is.

Redaction is by allowlist: in storage options, only the values of keys known to be harmless
(:data:`SAFE_OPTION_KEYS`: endpoint, region, anon, timeouts, retries...) are written anywhere;
every other value (``key``, ``secret``, ``token``, ``client_kwargs.aws_secret_access_key``, an
option nobody listed yet) becomes :data:`REDACTED`. A config read back from disk therefore holds
placeholders, never credentials (:func:`avts_dist.storage.get_fs` then takes the credentials
from the environment). Error messages are scrubbed of the secret values they may quote.

A leaf module: ``avts_dist.config`` (what is saved, logged and handed to launched jobs) and
``avts_dist.storage`` (what reaches filesystems and their errors) both import it, and it
imports neither.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = [
    "REDACTED",
    "SAFE_OPTION_KEYS",
    "redact",
    "redact_storage_options",
    "redacted_paths",
    "scrub",
]

REDACTED = "<redacted>"

# Storage-option keys (at any depth) whose values are not secrets. Anything else is redacted.
SAFE_OPTION_KEYS = frozenset(
    {
        # where and how to connect
        "endpoint_url", "endpoint", "region_name", "region", "anon", "use_ssl", "verify",
        "profile", "requester_pays", "version_aware", "cache_regions", "api_version",
        "signature_version", "addressing_style", "use_accelerate_endpoint",
        "payload_signing_enabled", "us_east_1_regional_endpoint", "project", "account_name",
        # containers whose own keys are checked one by one
        "client_kwargs", "config_kwargs", "s3_additional_kwargs", "s3", "retries",
        # timeouts, retries, pools, caches, block sizes
        "timeout", "connect_timeout", "read_timeout", "max_attempts", "total_max_attempts",
        "mode", "max_pool_connections", "tcp_keepalive", "max_concurrency",
        "fixed_upload_size", "default_block_size", "default_fill_cache", "default_cache_type",
        "use_listings_cache", "listings_expiry_time", "max_paths", "skip_instance_cache",
        "parameter_validation", "request_checksum_calculation", "response_checksum_validation",
        "ServerSideEncryption", "StorageClass", "ACL",
    }
)  # fmt: skip

_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.\-]*://[^/@:\s]*):[^/@\s]*@")


def _mask_url_password(text: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://user:<redacted>@host``."""
    return _URL_PASSWORD.sub(lambda m: f"{m.group('head')}:{REDACTED}@", text)


def redact_storage_options(options: Any) -> Any:
    """A copy of storage options where only :data:`SAFE_OPTION_KEYS` keep their values."""
    if not isinstance(options, dict):
        return REDACTED
    out: dict[str, Any] = {}
    for key, value in options.items():
        if str(key) not in SAFE_OPTION_KEYS:
            out[key] = REDACTED
        elif isinstance(value, dict):
            out[key] = redact_storage_options(value)
        elif isinstance(value, str):
            out[key] = _mask_url_password(value)
        elif isinstance(value, (list, tuple)):
            out[key] = REDACTED
        else:
            out[key] = value
    return out


def _redact_flat(key: str, value: Any) -> Any:
    """One flattened param (``data.storage_options.client_kwargs.region_name``)."""
    parts = key.split(".")
    if "storage_options" not in parts:
        return _mask_url_password(value) if isinstance(value, str) else value
    below = parts[parts.index("storage_options") + 1 :]
    if not below:  # the options themselves, as a mapping or its JSON text
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                return REDACTED
        return json.dumps(redact_storage_options(value)) if value else "{}"
    if any(p not in SAFE_OPTION_KEYS for p in below):
        return REDACTED
    if isinstance(value, str):
        return _mask_url_password(value)
    return REDACTED if isinstance(value, (list, tuple, dict)) else value


def redact(data: Any) -> Any:
    """A copy of a config mapping (nested, as saved) or of flattened params (``a.b.c`` keys,
    as logged to MLflow) with every ``storage_options`` value outside the allowlist replaced by
    :data:`REDACTED`, and passwords in URLs (``scheme://user:pw@host``) masked."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            if key == "storage_options":
                out[key] = redact_storage_options(value)
            elif "." in str(key) and not isinstance(value, (dict, list)):
                out[key] = _redact_flat(str(key), value)
            else:
                out[key] = redact(value)
        return out
    if isinstance(data, list):
        return [redact(v) for v in data]
    if isinstance(data, str):
        return _mask_url_password(data)
    return data


def redacted_paths(options: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the :data:`REDACTED` placeholders in ``options``."""
    if isinstance(options, dict):
        out = []
        for key, value in options.items():
            out += redacted_paths(value, f"{prefix}{key}.")
        return out
    return [prefix.rstrip(".")] if options == REDACTED else []


_MIN_SECRET_LEN = 6


def _secret_values(options: Any) -> list[str]:
    if isinstance(options, dict):
        return [s for k, v in options.items() for s in _secret_values_of(str(k), v)]
    return []


def _secret_values_of(key: str, value: Any) -> list[str]:
    if isinstance(value, dict):
        return _secret_values(value)
    # Shorter values are no real credential, and replacing them would garble the message.
    if key not in SAFE_OPTION_KEYS and isinstance(value, str) and len(value) >= _MIN_SECRET_LEN:
        return [value] if value != REDACTED else []
    return []


def scrub(text: str, options: dict[str, Any] | None) -> str:
    """``text`` (an error message) with every secret value of ``options`` replaced."""
    for secret in sorted(_secret_values(options or {}), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return _mask_url_password(text)
