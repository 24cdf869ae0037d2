"""A per-rank cache of block pieces, shared by the rank's data-loader workers.

Block access fetches a piece (a byte range of a shard) once per rank, whatever the number of
workers: pieces are files in one directory (tmpfs ``/dev/shm`` by default), named by
``(epoch, piece)``, and a worker that needs a clip reads just the clip's bytes from the file
(``os.pread``). So workers take whole global steps round-robin as in random access, any worker
can decode any sample, and worker memory holds no blocks.

- A fetch happens under an exclusive ``flock`` on ``<piece>.lock``: the first process to ask
  fetches, the others wait for it and then read the file. Locks die with their process, so a
  killed worker never leaves a piece locked.
- The file appears atomically (written aside, then renamed). A read that failed for good leaves
  ``<piece>.err`` with the reason, and readers fall back to reading their clip alone.
- Only the main process deletes (:meth:`BlockCache.evict`): it knows which global step was handed
  out, hence which windows no sample in flight can still need.
- The directory is removed when the loader closes or the process exits; directories left by a
  process killed hard are swept by the next loader on the same host.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import re
import shutil
import socket
import tempfile
import threading
import uuid
from collections.abc import Callable

from avts_dist.data.reader import ReadFailure

__all__ = ["BlockCache", "cache_base_dir"]

_PREFIX = "avts-blocks-"
_KEY_RE = re.compile(r"^e(\d+)-p(\d+)")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def cache_base_dir(configured: str, needed_bytes: int) -> str:
    """``configured`` if set; else /dev/shm when it has room for ``needed_bytes``, else the
    temp directory."""
    if configured:
        return configured
    shm = "/dev/shm"
    with contextlib.suppress(OSError):
        st = os.statvfs(shm)
        if os.access(shm, os.W_OK) and st.f_bavail * st.f_frsize >= 2 * needed_bytes:
            return shm
    return tempfile.gettempdir()


def _sweep_stale(base: str) -> None:
    """Removes cache directories of processes of this host that no longer run."""
    host = _host()
    with contextlib.suppress(OSError):
        for entry in os.scandir(base):
            m = re.fullmatch(rf"{_PREFIX}{host}-(\d+)-.*", entry.name)
            if not m or not entry.is_dir():
                continue
            try:
                os.kill(int(m.group(1)), 0)
            except ProcessLookupError:
                shutil.rmtree(entry.path, ignore_errors=True)
            except PermissionError:
                pass  # alive, another user's


def key_of(epoch: int, piece: int) -> str:
    return f"e{epoch}-p{piece}"


class BlockCache:
    """Piece files under ``root``; see the module docstring. Picklable (workers get the path)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._owner = os.getpid()

    @classmethod
    def create(cls, base: str, rank: int) -> BlockCache:
        try:
            os.makedirs(base, exist_ok=True)
            _sweep_stale(base)
            root = os.path.join(
                base, f"{_PREFIX}{_host()}-{os.getpid()}-r{rank}-{uuid.uuid4().hex[:8]}"
            )
            os.makedirs(root)
        except OSError as exc:
            raise OSError(
                f"cannot create the block cache under {base!r} (data.block_cache_dir): {exc}"
            ) from None
        cache = cls(root)
        atexit.register(cache.close)
        return cache

    def _path(self, key: str) -> str:
        return os.path.join(self.root, key)

    def has(self, key: str) -> bool:
        return os.path.exists(self._path(key))

    def fetch(self, key: str, read: Callable[[], bytes], *, wait: bool = True) -> bool:
        """Makes piece ``key`` present, calling ``read()`` under the piece's lock unless another
        process already has. ``wait=False`` returns False at once when another holds the lock.
        Raises :class:`ReadFailure` when the piece failed (now or before)."""
        path = self._path(key)
        if os.path.exists(path):
            return True
        self._raise_failed(path)
        fd = os.open(path + ".lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                return False
            if os.path.exists(path):
                return True
            self._raise_failed(path)
            try:
                data = read()
            except ReadFailure as exc:
                with contextlib.suppress(OSError), open(path + ".err", "w") as f:
                    f.write(f"{exc.reason}\n{exc}")
                raise
            tmp = f"{path}.tmp{os.getpid()}-{threading.get_ident()}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except OSError as exc:  # a full tmpfs: readers fall back to clip reads
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise ReadFailure("read_error", f"block cache write failed: {exc}") from None
            return True
        finally:
            os.close(fd)  # releases the lock

    def _raise_failed(self, path: str) -> None:
        try:
            with open(path + ".err") as f:
                reason, _, message = f.read().partition("\n")
        except FileNotFoundError:
            return
        raise ReadFailure(reason or "read_error", f"block failed: {message}")

    def read(self, key: str, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of a present piece."""
        fd = os.open(self._path(key), os.O_RDONLY)
        try:
            data = os.pread(fd, size, offset)
        finally:
            os.close(fd)
        if len(data) != size:
            raise ReadFailure("read_error", f"short read in block cache: {len(data)} of {size}")
        return data

    def evict(self, done: Callable[[int, int], bool]) -> int:
        """Deletes every file of the pieces ``(epoch, piece)`` for which ``done`` is true;
        returns the bytes of the pieces kept."""
        kept = 0
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.root):
                m = _KEY_RE.match(entry.name)
                if m is None:
                    continue
                if done(int(m.group(1)), int(m.group(2))):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                elif entry.name == m.group(0):
                    with contextlib.suppress(FileNotFoundError):
                        kept += entry.stat().st_size
        return kept

    def close(self) -> None:
        if os.getpid() == self._owner:
            shutil.rmtree(self.root, ignore_errors=True)
