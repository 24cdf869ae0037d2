"""File integrity for checkpoints: each file's size and sha256, taken while the file is written,
and checked (sizes first, then hashes) before any file is read.

The digest is the plain sha256 of the whole file, whatever its size: ``sha256sum FILE`` gives the
same hex string. It is computed from the bytes on their way to the file (``torch.save`` into a
hashing writer), so a save reads nothing back; its cost against the save itself is measured by
``tests/benchmarks/bench_checkpoint.py`` (docs/benchmarks.md). A read-back
(:func:`file_record` with ``from_disk=True``) flushes the file to the device and drops it from
the page cache first, so that it reads what the disk holds, not what was just written.

Writes go through :func:`save_torch`: an ``OSError`` of the write itself (``ENOSPC``: "No space
left on device") comes out as that ``OSError``, not as torch's
``[enforce fail at inline_container.cc] unexpected pos``, and the partial file is removed.
"""

from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = [
    "FileProblem",
    "FileRecord",
    "file_record",
    "format_bytes",
    "save_torch",
    "stream_record",
    "verify_files",
]

_READ_BLOCK = 8 << 20


@dataclass(frozen=True)
class FileRecord:
    size: int
    sha256: str

    def as_json(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class FileProblem:
    """One file that does not match its manifest entry. ``kind``: missing | size | sha256."""

    name: str
    kind: str
    text: str


def format_bytes(num: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(num) < 1024 or unit == "TiB":
            return f"{num:.0f} {unit}" if unit == "B" else f"{num:.1f} {unit}"
        num /= 1024
    raise AssertionError("unreachable")


class _HashingWriter(io.RawIOBase):
    """A write-only stream that hashes what it passes on to ``file``; it keeps the first
    ``OSError`` of the file, which torch's zip writer would otherwise bury under its own."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._hash = hashlib.sha256()
        self.size = 0
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            num = self._file.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise
        self._hash.update(data)
        self.size += num
        return num

    def record(self) -> FileRecord:
        return FileRecord(self.size, self._hash.hexdigest())


def save_torch(obj: Any, path: str | Path, *, zipfile_serialization: bool = True) -> FileRecord:
    """``torch.save(obj, path)`` that returns the file's size and sha256, computed while writing.
    An ``OSError`` of the write (e.g. ENOSPC) is raised as such and the partial file removed."""
    writer = None
    try:
        with open(path, "wb") as f:
            writer = _HashingWriter(f)
            torch.save(obj, writer, _use_new_zipfile_serialization=zipfile_serialization)
    except BaseException as exc:
        with_error = writer.error if writer is not None else None
        Path(path).unlink(missing_ok=True)
        if with_error is not None and not isinstance(exc, OSError):
            raise with_error from None
        raise
    return writer.record()


def stream_record(stream: BinaryIO) -> FileRecord:
    """Size and sha256 of everything ``stream`` yields (a local or remote file)."""
    digest, size = hashlib.sha256(), 0
    while block := stream.read(_READ_BLOCK):
        digest.update(block)
        size += len(block)
    return FileRecord(size, digest.hexdigest())


def file_record(path: str | Path, *, from_disk: bool = False) -> FileRecord:
    """Size and sha256 of a local file. ``from_disk``: flush it to the device and drop it from
    the page cache before reading, so the read comes from the disk (Linux; elsewhere a plain
    read)."""
    with open(path, "rb") as f:
        if from_disk:
            os.fsync(f.fileno())
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return stream_record(f)


def verify_files(
    folder: str | Path, manifest: dict[str, dict[str, Any]], *, num_threads: int = 0
) -> list[FileProblem]:
    """The files of ``manifest`` (``{name: {"size": n, "sha256": hex}}``) that do not match it in
    ``folder``: every size first (a stat each), and only when all sizes match, the hashes (files
    in parallel threads: hashlib releases the GIL). An entry without ``sha256`` is checked by
    size only."""
    folder = Path(folder)
    problems = []
    for name, entry in sorted(manifest.items()):
        path = folder / name
        if not path.is_file():
            problems.append(FileProblem(name, "missing", f"{name} is missing"))
            continue
        size = path.stat().st_size
        if size != entry["size"]:
            text = f"{name} has {size} bytes, the manifest says {entry['size']}"
            problems.append(FileProblem(name, "size", text))
    if problems:
        return problems
    hashed = sorted(n for n, e in manifest.items() if e.get("sha256"))
    num_threads = num_threads or min(8, os.cpu_count() or 1, max(len(hashed), 1))
    with ThreadPoolExecutor(num_threads) as pool:
        records = dict(
            zip(hashed, pool.map(lambda n: file_record(folder / n), hashed), strict=True)
        )
    for name in hashed:
        if records[name].sha256 != manifest[name]["sha256"]:
            text = f"{name}: its sha256 differs from the manifest's (same size: changed content)"
            problems.append(FileProblem(name, "sha256", text))
    return problems
