"""fsspec access with the usual credentials, clear errors, and no credential ever written.

Credentials and endpoints come the way AWS tools take them: ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_PROFILE`` / ``~/.aws``, and ``AWS_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3``) for S3-compatible stores. Explicit ``storage_options`` (the CLI's
``--storage-options JSON``, ``data.storage_options``, ``checkpoint.storage_options``) are merged
over those.

Redaction is by allowlist: in storage options, only the values of keys known to be harmless
(:data:`SAFE_OPTION_KEYS`: endpoint, region, anon, timeouts, retries...) are written anywhere;
every other value (``key``, ``secret``, ``token``, ``client_kwargs.aws_secret_access_key``, an
option nobody listed yet) becomes :data:`REDACTED`. A config read back from disk therefore holds
placeholders, never credentials: :func:`get_fs` then takes the credentials from the environment,
and says so, or stops with an error that says how to give them again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.utils import get_protocol

from avts_dist.config import deep_merge

__all__ = [
    "REDACTED",
    "SAFE_OPTION_KEYS",
    "StorageAccessError",
    "StorageError",
    "StorageNotFoundError",
    "StorageUnreachableError",
    "atomic_write_text",
    "check_bucket",
    "get_fs",
    "is_remote",
    "join",
    "local_path",
    "protocol_of",
    "redact",
    "redact_storage_options",
    "redacted_paths",
]

log = logging.getLogger("avts.storage")

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


class StorageError(RuntimeError):
    """A storage URL that cannot be used, with the reason in words."""


class StorageUnreachableError(StorageError):
    """The storage endpoint does not answer (refused, timed out, unknown host)."""


class StorageNotFoundError(StorageError):
    """The endpoint answers, but the bucket (or key) does not exist."""


class StorageAccessError(StorageError):
    """The endpoint answers, but refuses the credentials (or there are none)."""


# ---------------------------------------------------------------------------------------------
# Redaction


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


def _without_redacted(options: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in options.items():
        if isinstance(value, dict):
            value = _without_redacted(value)
        if value != REDACTED:
            out[key] = value
    return out


_AWS_CREDENTIAL_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


def _environment_has_credentials(protocol: str) -> bool:
    if protocol in ("s3", "s3a"):
        return (
            any(os.environ.get(k) for k in _AWS_CREDENTIAL_ENV)
            or (Path.home() / ".aws" / "credentials").is_file()
        )
    return False


_ANNOUNCED: set[tuple[str, tuple[str, ...]]] = set()


def _drop_redacted(url: str, protocol: str, options: dict[str, Any]) -> dict[str, Any]:
    """Options read back from a saved config hold placeholders: the environment must stand in."""
    missing = redacted_paths(options)
    if not missing:
        return options
    if not _environment_has_credentials(protocol):
        raise StorageError(
            f"storage options {', '.join(missing)} for {url} hold the placeholder {REDACTED!r} "
            "(credentials are never written to configs or checkpoints): give them again in your "
            "config, as key=value overrides or --storage-options, or through the environment "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
        )
    said = (url, tuple(missing))
    if said not in _ANNOUNCED:
        _ANNOUNCED.add(said)
        log.warning(
            "storage options %s for %s were redacted when saved: using the environment's "
            "credentials",
            ", ".join(missing),
            url,
        )
    return _without_redacted(options)


# ---------------------------------------------------------------------------------------------
# Filesystems

# botocore waits 60 s for a connection by default; an endpoint that does not answer should say
# so sooner. Explicit storage options override these.
_S3_CONNECT_TIMEOUT_S = 10


def _s3_defaults() -> dict[str, Any]:
    out: dict[str, Any] = {"config_kwargs": {"connect_timeout": _S3_CONNECT_TIMEOUT_S}}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        out["client_kwargs"] = {"endpoint_url": endpoint}
    return out


# The protocols of this machine's own filesystem: every other one (s3, memory, gcs...) has no
# local path, so the checkpoint component stages it and fetches it.
_LOCAL_PROTOCOLS = ("file", "local")


def protocol_of(url: str) -> str:
    """fsspec's protocol of ``url``, lower case: ``s3``, ``memory``...; ``file`` for a plain path
    or a ``file://`` URL; the outermost one of a chained URL (``simplecache::s3://...``)."""
    return get_protocol(str(url)).lower()


def is_remote(url: str) -> bool:
    """True for a URL of another filesystem than the local one (``s3://``, ``memory://``); False
    for a local path or a ``file://`` URL. The one answer to "is it remote" in this package."""
    return protocol_of(url) not in _LOCAL_PROTOCOLS


def local_path(url: str) -> str:
    """The filesystem path of a local path or ``file://`` URL."""
    return url.removeprefix("file://")


def atomic_write_text(path: Path, text: str) -> None:
    """Writes a small local file whole or not at all: a temporary beside it, fsync'ed, renamed."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def get_fs(
    url: str, storage_options: dict[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """Returns ``(filesystem, path)`` for a local path, ``file://``, ``s3://`` or ``memory://`` URL."""
    if not url:
        raise StorageError("empty storage URL")
    protocol = protocol_of(url)
    options = _drop_redacted(url, protocol, dict(storage_options or {}))
    if protocol in ("s3", "s3a"):
        options = deep_merge(_s3_defaults(), options)
    try:
        return url_to_fs(url, **options)
    except (ValueError, ImportError, TypeError) as exc:
        raise StorageError(f"cannot open storage URL {url!r}: {scrub(str(exc), options)}") from None


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


# ---------------------------------------------------------------------------------------------
# Bucket checks with errors that say which of three things is wrong


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


def bucket_of(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """The bucket of ``path`` on an object store; None on a filesystem without buckets."""
    if any(p in ("s3", "s3a", "gs", "gcs", "abfs", "az") for p in _protocols(fs)):
        return path.split("/", 1)[0]
    return None


def _s3_endpoint(fs) -> str:
    endpoint = (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url")
    if endpoint:
        return endpoint
    region = (getattr(fs, "client_kwargs", None) or {}).get("region_name") or os.environ.get(
        "AWS_DEFAULT_REGION", "us-east-1"
    )
    return f"https://s3.{region}.amazonaws.com"


# A probe that gives up quickly: one retry, a short connect timeout.
_PROBE_CONFIG = {"connect_timeout": 5, "read_timeout": 30, "retries": {"max_attempts": 2}}


def _probe_s3_bucket(fs, bucket: str, url: str, anon: bool = False) -> None:
    import botocore.exceptions as bex

    endpoint = _s3_endpoint(fs)
    extra: dict[str, Any] = {"config_kwargs": _PROBE_CONFIG, "skip_instance_cache": True}
    if anon:
        extra["anon"] = True
    probe = type(fs)(**deep_merge(fs.storage_options, extra))
    unreachable: tuple[type[BaseException], ...] = (
        bex.EndpointConnectionError,
        bex.ConnectTimeoutError,
        bex.ReadTimeoutError,
        bex.ProxyConnectionError,
        TimeoutError,
        ConnectionError,
    )
    try:
        probe.call_s3("head_bucket", Bucket=bucket)
    except unreachable as exc:
        raise StorageUnreachableError(
            f"storage endpoint {endpoint} is unreachable (for {url}): "
            f"{scrub(str(exc), fs.storage_options)}"
        ) from None
    except FileNotFoundError:
        raise StorageNotFoundError(
            f"bucket {bucket!r} does not exist at {endpoint} (for {url})"
        ) from None
    except PermissionError as exc:
        raise StorageAccessError(
            f"access to bucket {bucket!r} at {endpoint} refused (for {url}): check the "
            f"credentials ({scrub(str(exc), fs.storage_options)})"
        ) from None
    except bex.NoCredentialsError:
        # Nothing was sent: an unsigned request tells whether the endpoint answers at all.
        if not anon:
            with contextlib.suppress(StorageNotFoundError, StorageAccessError):
                _probe_s3_bucket(fs, bucket, url, anon=True)
        raise StorageAccessError(
            f"no credentials for {url} at {endpoint}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
            "or AWS_PROFILE, or give key/secret in the storage options (or anon: true)"
        ) from None
    except Exception as exc:  # anything else botocore/aiohttp raise: still say where
        raise StorageError(
            f"cannot use bucket {bucket!r} at {endpoint} (for {url}): "
            f"{type(exc).__name__}: {scrub(str(exc), fs.storage_options)}"
        ) from None


def check_bucket(fs: fsspec.AbstractFileSystem, path: str, url: str) -> None:
    """Raises, in one line, what keeps ``url`` from being used: an unreachable endpoint (with its
    URL), a missing bucket, or refused credentials. Filesystems without buckets pass."""
    bucket = bucket_of(fs, path)
    if bucket is None:
        return
    if not bucket:
        raise StorageError(f"URL {url!r} names no bucket (expected s3://BUCKET/PATH)")
    if any(p in ("s3", "s3a") for p in _protocols(fs)):
        _probe_s3_bucket(fs, bucket, url)
        return
    try:
        exists = fs.exists(bucket)
    except Exception as exc:  # other object stores: their own errors, with the URL
        raise StorageError(f"cannot reach bucket {bucket!r} of {url!r}: {exc}") from None
    if not exists:
        raise StorageNotFoundError(f"bucket {bucket!r} does not exist (for {url})")
