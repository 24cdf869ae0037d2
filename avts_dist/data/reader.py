"""Byte-range reads of clip members and blocks, with bounded concurrency and counted retries.

A clip is one ranged request (``read_member`` of the shard format) and a block (block access) is
one ranged request over a run of clips; no shard is ever downloaded whole. Reads run on a small
thread pool (``concurrency`` in flight at most) so that a batch's requests are all issued before
its first clip is decoded: storage latency hides behind decoding. Transient failures (HTTP 5xx,
throttling, timeouts, connection resets, short reads) are retried with exponential backoff; a
read that still fails, or whose object is missing, raises :class:`ReadFailure` with the reason
the loader counts.

Every retry is ours, so every retry is counted: the S3 client's own retry layers (botocore's
retry handler, s3fs's ``_error_wrapper`` and aiohttp's second try of a dropped connection) are
turned off for the reader's filesystem, unless the storage options set botocore's ``retries`` or
``http_session_cls`` explicitly (then those stay invisible).
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from avts_dist.data.index import DatasetIndex
from avts_dist.storage import get_fs, join, protocol_of

__all__ = ["ClipReader", "ReadFailure", "is_transient", "own_retries_options"]

# s3fs-specific knobs (its retry attribute, botocore's retries) apply to these alone.
_S3_PROTOCOLS = ("s3", "s3a")

# Errors that retrying cannot fix. Everything else raised by a read (OSError from s3fs's
# translation of 5xx/throttling, aiohttp/botocore connection errors, timeouts) is transient.
_PERMANENT = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    KeyError,
    ValueError,
    TypeError,
)


class ReadFailure(RuntimeError):
    """A member that could not be read; ``reason`` is ``"missing"`` or ``"read_error"``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def is_transient(exc: BaseException) -> bool:
    return not isinstance(exc, _PERMANENT)


def _one_attempt_session_cls():
    """aiobotocore's HTTP session, minus aiohttp's silent second try of an idempotent request
    whose connection dropped before the response (RFC 9112 allows it; we retry, and count)."""
    from aiobotocore.httpsession import AIOHTTPSession

    class OneAttemptSession(AIOHTTPSession):
        async def _get_session(self, proxy_url):
            session = await super()._get_session(proxy_url)
            session._retry_connection = False
            return session

    return OneAttemptSession


def own_retries_options(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """Storage options with the S3 client's hidden retries off (one attempt per call), on a
    private filesystem instance (s3fs's retry count is an attribute we set on it): botocore's
    retry handler, and aiohttp's retry of a dropped connection."""
    if protocol_of(url) not in _S3_PROTOCOLS:
        return dict(options)
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("retries", {"total_max_attempts": 1})
    config.setdefault("http_session_cls", _one_attempt_session_cls())
    return {**options, "config_kwargs": config, "skip_instance_cache": True}


class ClipReader:
    """Reads members of one dataset; safe to use from threads, re-creates its filesystem after
    a fork (each data-loader worker gets its own connections)."""

    def __init__(
        self,
        index: DatasetIndex,
        *,
        storage_options: dict[str, Any] | None = None,
        max_retries: int = 4,
        retry_backoff_s: float = 0.1,
        concurrency: int = 8,
    ) -> None:
        self.index = index
        self.storage_options = dict(
            storage_options if storage_options is not None else index.storage_options
        )
        self.max_retries = max(0, int(max_retries))
        self.retry_backoff_s = float(retry_backoff_s)
        self.concurrency = max(1, int(concurrency))
        self._pid: int | None = None
        self._fs = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.retries = 0
        self.requests = 0
        self.read_failures = 0
        self.read_s = 0.0

    def __getstate__(self) -> dict[str, Any]:
        # Pools and connections never travel to another process.
        state = self.__dict__.copy()
        state.update(_pid=None, _fs=None, _pool=None, _lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _ensure(self) -> None:
        pid = os.getpid()
        if self._pid != pid:
            url = self.index.url
            self._fs, _ = get_fs(url, own_retries_options(url, self.storage_options))
            if protocol_of(url) in _S3_PROTOCOLS:
                self._fs.retries = 1  # s3fs's _error_wrapper: one attempt, we retry
            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="avts-read")
            self._lock = threading.Lock()
            self._pid = pid

    @property
    def fs(self):
        self._ensure()
        return self._fs

    def read(self, row: int, ext: str = "mp4") -> bytes:
        """The member's bytes, retried on transient errors; raises :class:`ReadFailure`."""
        try:
            shard_url, offset, size = self.index.member(row, ext)
        except KeyError as exc:
            raise ReadFailure("read_error", f"KeyError: {exc}") from None
        return self.read_range(shard_url, offset, offset + size)

    def read_range(self, url: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of object ``url`` in one request per attempt, retried on
        transient errors (a short read is one); raises :class:`ReadFailure`."""
        self._ensure()
        path = self._fs._strip_protocol(url)
        last: BaseException | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                # Exponential backoff with jitter, so workers do not retry in lockstep.
                delay = self.retry_backoff_s * (2 ** (attempt - 1)) * (0.5 + random.random())
                time.sleep(delay)
                with self._lock:
                    self.retries += 1
            t0 = time.perf_counter()
            try:
                with self._lock:
                    self.requests += 1
                data = self._fs.cat_file(path, start=start, end=end)
                if len(data) != end - start:
                    raise OSError(f"short read: {len(data)} of {end - start} bytes")
            except BaseException as exc:
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                if not is_transient(exc):
                    reason = "missing" if isinstance(exc, FileNotFoundError) else "read_error"
                    with self._lock:
                        self.read_failures += 1
                    raise ReadFailure(reason, f"{type(exc).__name__}: {exc}") from None
                last = exc
                continue
            finally:
                with self._lock:
                    self.read_s += time.perf_counter() - t0
            with self._lock:
                self.bytes_read += len(data)
            return data
        with self._lock:
            self.read_failures += 1
        raise ReadFailure(
            "read_error",
            f"gave up after {self.max_retries + 1} attempts: {type(last).__name__}: {last}",
        )

    def shard_url(self, shard_id: int) -> str:
        return join(self.index.url, self.index.shards[int(shard_id)])

    def submit(self, row: int, ext: str = "mp4") -> Future:
        """Starts a read on the pool (at most ``concurrency`` in flight); ``.result()`` gives the
        bytes or raises :class:`ReadFailure`."""
        self._ensure()
        assert self._pool is not None
        return self._pool.submit(self.read, row, ext)

    def run(self, fn, *args) -> Future:
        """Runs ``fn(*args)`` on the read pool (block reads go through the same bound)."""
        self._ensure()
        assert self._pool is not None
        return self._pool.submit(fn, *args)

    def take_stats(self) -> dict[str, float]:
        """Counters since the last call, then zeroed: bytes_read, requests (attempts), retries,
        read_failures (reads given up, or failed for good at once), read_s."""
        names = ("bytes_read", "requests", "retries", "read_failures", "read_s")
        with self._lock:
            out = {name: getattr(self, name) for name in names}
            for name in names:
                setattr(self, name, type(out[name])())
        return out

    def close(self, wait: bool = False) -> None:
        """Drops queued reads (``wait``: lets running ones finish, so their counts are in) and
        closes the S3 client's connections on their own event loop: left to garbage collection,
        a forked worker may inherit the client and close it on its own loop (asyncio errors)."""
        if self._pool is not None and self._pid == os.getpid():
            self._pool.shutdown(wait=wait, cancel_futures=True)
        creator = getattr(self._fs, "_s3creator", None)
        if creator is not None and self._pid == os.getpid():
            with contextlib.suppress(Exception):
                self._fs.close_session(self._fs.loop, creator)
        self._fs = None
        self._pool = None
        self._pid = None
