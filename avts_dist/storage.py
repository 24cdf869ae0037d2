"""fsspec access with the usual credentials, and clear errors for bad URLs.

Credentials and endpoints come the way AWS tools take them: ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_PROFILE`` / ``~/.aws``, and ``AWS_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3``) for S3-compatible stores. Explicit ``storage_options`` (the CLI's
``--storage-options JSON``) are merged over those.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from avts_dist.config import deep_merge

__all__ = ["StorageError", "get_fs", "is_remote", "join", "local_path", "redact"]

_SECRET_WORDS = ("secret", "password", "token", "credential", "session", "key_id", "access_key")


class StorageError(RuntimeError):
    """A storage URL that cannot be used, with the reason in words."""


def _s3_defaults() -> dict[str, Any]:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}


def is_remote(url: str) -> bool:
    """True for a URL of another filesystem (``s3://``, ``memory://``); False for a local path
    or a ``file://`` URL."""
    return "://" in url and not url.startswith("file://")


def local_path(url: str) -> str:
    """The filesystem path of a local path or ``file://`` URL."""
    return url.removeprefix("file://")


def get_fs(
    url: str, storage_options: dict[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """Returns ``(filesystem, path)`` for a local path, ``file://``, ``s3://`` or ``memory://`` URL."""
    if not url:
        raise StorageError("empty storage URL")
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    options = dict(storage_options or {})
    if protocol in ("s3", "s3a"):
        options = deep_merge(_s3_defaults(), options)
    try:
        return url_to_fs(url, **options)
    except (ValueError, ImportError) as exc:
        raise StorageError(f"cannot open storage URL {url!r}: {exc}") from None


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def redact(options: Any) -> Any:
    """A copy of storage options (or any nested mapping) with secret values replaced."""
    if isinstance(options, dict):
        return {
            k: ("***" if any(w in str(k).lower() for w in _SECRET_WORDS) else redact(v))
            for k, v in options.items()
        }
    if isinstance(options, list):
        return [redact(v) for v in options]
    return options
