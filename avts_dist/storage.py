"""fsspec access with the usual credentials, clear errors, and no credential ever written.

Credentials and endpoints come the way AWS tools take them: ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_PROFILE`` / ``~/.aws``, and ``AWS_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3``) for S3-compatible stores. Explicit ``storage_options`` (the CLI's
``--storage-options JSON``, ``data.storage_options``, ``checkpoint.storage_options``) are merged
over those.

Redaction by allowlist lives in :mod:`avts_dist.secrets`. A config read back from disk holds
its placeholders, never credentials: :func:`get_fs` then takes the credentials from the
environment, and says so, or stops with an error that says how to give them again.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.utils import get_protocol

from avts_dist.config import deep_merge
from avts_dist.secrets import REDACTED, redacted_paths, scrub

__all__ = [
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
]

log = logging.getLogger("avts.storage")


class StorageError(RuntimeError):
    """A storage URL that cannot be used, with the reason in words."""


class StorageUnreachableError(StorageError):
    """The storage endpoint does not answer (refused, timed out, unknown host)."""


class StorageNotFoundError(StorageError):
    """The endpoint answers, but the bucket (or key) does not exist."""


class StorageAccessError(StorageError):
    """The endpoint answers, but refuses the credentials (or there are none)."""


# ---------------------------------------------------------------------------------------------
# Placeholders of saved configs


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
