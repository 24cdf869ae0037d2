"""Where checkpoints live: one protocol, two implementations (after torchtitan's
``CheckpointStorage``), so that the save protocol, retention and quarantine read the same on a
local disk and on an object store.

- :class:`LocalStorage`: ``checkpoint.dir`` is a local (shared) folder; DeepSpeed writes into it
  and the written folder is the checkpoint.
- :class:`RemoteStorage`: ``checkpoint.dir`` is a URL (``s3://``, ``memory://``); DeepSpeed writes
  into a local staging folder (``checkpoint.staging_dir``, default
  ``<run.dir>/checkpoint_staging``, which may be node-local), every rank uploads its files, and
  the remote copy is the checkpoint. The staged copies are a cache, kept as many as keep-last.

``tmp_dir`` is the local folder a save writes into (``<local_root>/.tmp-<tag>``) and ``dest`` the
name the tag is published under. Methods that touch the store are called on one rank (rank 0).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Protocol

from avts_dist.config import CheckpointConfig
from avts_dist.integrity import FileRecord, file_record, stream_record
from avts_dist.storage import (
    StorageError,
    atomic_write_text,
    get_fs,
    is_remote,
    join,
    local_path,
)
from avts_dist.train.checkpoint.refs import (
    COMPLETE,
    LATEST,
    QUARANTINED,
    CheckpointError,
    check_reachable,
)

__all__ = ["UPLOADS", "CheckpointStorage", "LocalStorage", "RemoteStorage", "storage_for"]

log = logging.getLogger("avts.train")

UPLOADS = ".uploads"


class CheckpointStorage(Protocol):
    url: str  # checkpoint.dir
    options: dict[str, Any]
    # Where DeepSpeed writes (the checkpoints themselves, or their staged copies).
    local_root: Path
    # True when a staged copy is only a cache of the checkpoint (a failure to keep it is no error).
    staging_is_cache: bool

    def check(self, num_filesystems: int) -> None:
        """Rank 0: CheckpointError when the ranks cannot use this storage."""

    def where(self, tmp_dir: Path, dest: str) -> str:
        """Where a tag being saved is, for messages."""

    def upload(self, tmp_dir: Path, dest: str, names: list[str]) -> None:
        """This rank's files of ``tmp_dir``, put where the checkpoint lives."""

    def sizes(self, tmp_dir: Path, dest: str, names: list[str]) -> dict[str, int]:
        """The size of each of ``names`` as stored (absent: not listed)."""

    def records(self, tmp_dir: Path, dest: str, names: list[str]) -> dict[str, FileRecord]:
        """Size and sha256 of each of ``names``, read back from where they are stored."""

    def publish(self, dest: str, meta: dict[str, Any], note: dict[str, str] | None) -> None:
        """Rank 0: the marker (and ``latest`` unless ``note``, a quarantine note) on the store."""

    def discard(self, dest: str) -> None:
        """Rank 0: whatever a failed save of ``dest`` left on the store."""

    def listed_sizes(self, tag: str) -> dict[str, int] | None:
        """The sizes a listing gives of ``tag``'s files; None: verify it locally instead."""

    def delete(self, tag: str) -> None:
        """Rank 0: a checkpoint retention no longer keeps."""

    def prune_staged(self, tags_to_delete: list[str]) -> None:
        """Each filesystem's first rank: staged copies of checkpoints no longer kept."""

    def quarantine(self, tag: str, name: str, note: str) -> None:
        """Rank 0: ``tag`` renamed ``name`` (never deleted), with a ``QUARANTINED`` note."""

    def point_latest(self, tag: str) -> None:
        """Rank 0: ``latest`` names ``tag``."""

    def read_latest(self) -> str | None:
        """The tag ``latest`` names on the local copy, if this storage reads it there."""


def _drop_universal(root: Path, tag: str) -> None:
    # A universal form is made from its tag's files: it goes where the tag goes.
    shutil.rmtree(root / f"{tag}_universal", ignore_errors=True)


class LocalStorage:
    """``checkpoint.dir`` on a filesystem every rank shares."""

    staging_is_cache = False

    def __init__(self, cfg: CheckpointConfig) -> None:
        self.url, self.options = cfg.dir, dict(cfg.storage_options or {})
        self.local_root = Path(local_path(cfg.dir))

    def check(self, num_filesystems: int) -> None:
        if num_filesystems > 1:
            raise CheckpointError(
                f"checkpoint.dir={self.url} is not one filesystem for all ranks (they see "
                f"{num_filesystems}): use a shared filesystem or an s3:// checkpoint.dir"
            )

    def where(self, tmp_dir: Path, dest: str) -> str:
        return str(tmp_dir)

    def upload(self, tmp_dir: Path, dest: str, names: list[str]) -> None:
        return None  # written in place

    def sizes(self, tmp_dir: Path, dest: str, names: list[str]) -> dict[str, int]:
        return {n: (tmp_dir / n).stat().st_size for n in names if (tmp_dir / n).is_file()}

    def records(self, tmp_dir: Path, dest: str, names: list[str]) -> dict[str, FileRecord]:
        # Past the page cache: what the disk holds, not what was just written.
        return {name: file_record(tmp_dir / name, from_disk=True) for name in names}

    def publish(self, dest: str, meta: dict[str, Any], note: dict[str, str] | None) -> None:
        return None  # the local copy is the checkpoint: published by the filesystem's leader

    def discard(self, dest: str) -> None:
        return None  # the temporary folder is all there is

    def listed_sizes(self, tag: str) -> dict[str, int] | None:
        return None

    def delete(self, tag: str) -> None:
        shutil.rmtree(self.local_root / tag, ignore_errors=True)
        _drop_universal(self.local_root, tag)

    def prune_staged(self, tags_to_delete: list[str]) -> None:
        return None  # no staged copies: delete() took the checkpoints themselves

    def quarantine(self, tag: str, name: str, note: str) -> None:
        os.replace(self.local_root / tag, self.local_root / name)
        atomic_write_text(self.local_root / name / QUARANTINED, note)
        _drop_universal(self.local_root, tag)

    def point_latest(self, tag: str) -> None:
        atomic_write_text(self.local_root / LATEST, tag)

    def read_latest(self) -> str | None:
        path = self.local_root / LATEST
        return path.read_text().strip() if path.is_file() else None


class RemoteStorage:
    """``checkpoint.dir`` on an object store, staged through ``local_root``."""

    staging_is_cache = True

    def __init__(self, cfg: CheckpointConfig, staging: Path) -> None:
        self.url, self.options = cfg.dir, dict(cfg.storage_options or {})
        self.local_root = staging

    def _fs(self):
        return get_fs(self.url, self.options or None)

    def check(self, num_filesystems: int) -> None:
        # Node-local staging folders are fine; an endpoint that does not answer is said now.
        try:
            check_reachable(self.url, self.options)
        except StorageError as exc:
            raise CheckpointError(f"checkpoint.dir={self.url}: {exc}") from None

    def where(self, tmp_dir: Path, dest: str) -> str:
        return join(self.url, dest)

    def upload(self, tmp_dir: Path, dest: str, names: list[str]) -> None:
        fs, root = self._fs()
        for name in sorted(names):
            fs.put_file(str(tmp_dir / name), join(root, dest, name))

    def _listing(self, dest: str) -> dict[str, int]:
        fs, root = self._fs()
        prefix = join(root, dest) + "/"
        try:
            listing = fs.find(prefix, detail=True)
        except FileNotFoundError:
            listing = {}
        return {p.split(prefix, 1)[-1]: info["size"] for p, info in listing.items()}

    def sizes(self, tmp_dir: Path, dest: str, names: list[str]) -> dict[str, int]:
        return self._listing(dest)

    def records(self, tmp_dir: Path, dest: str, names: list[str]) -> dict[str, FileRecord]:
        fs, root = self._fs()
        stored = {}
        for name in names:
            with fs.open(join(root, dest, name), "rb") as f:
                stored[name] = stream_record(f)
        return stored

    def publish(self, dest: str, meta: dict[str, Any], note: dict[str, str] | None) -> None:
        fs, root = self._fs()
        if note is not None:
            fs.pipe_file(join(root, dest, QUARANTINED), json.dumps(note).encode())
        # The marker last: a reader that sees it sees every file.
        fs.pipe_file(join(root, dest, COMPLETE), json.dumps(meta, indent=1).encode())
        if note is None:
            fs.pipe_file(join(root, LATEST), dest.encode())

    def discard(self, dest: str) -> None:
        fs, root = self._fs()
        fs.rm(join(root, dest), recursive=True)

    def listed_sizes(self, tag: str) -> dict[str, int] | None:
        return self._listing(tag)

    def delete(self, tag: str) -> None:
        fs, root = self._fs()
        fs.rm(join(root, tag), recursive=True)

    def prune_staged(self, tags_to_delete: list[str]) -> None:
        for tag in tags_to_delete:
            shutil.rmtree(self.local_root / tag, ignore_errors=True)
            _drop_universal(self.local_root, tag)

    def quarantine(self, tag: str, name: str, note: str) -> None:
        fs, root = self._fs()
        # File by file: an object store has no rename of a prefix (and fsspec's recursive mv
        # trips over the prefix itself on S3).
        source = join(root, tag)
        for path in fs.find(source):
            fs.copy(path, join(root, name, path[len(source) :]))
        fs.rm(source, recursive=True)
        fs.pipe_file(join(root, name, QUARANTINED), note.encode())
        fs.invalidate_cache(root)
        shutil.rmtree(self.local_root / tag, ignore_errors=True)  # a staged copy of it
        _drop_universal(self.local_root, tag)

    def point_latest(self, tag: str) -> None:
        fs, root = self._fs()
        fs.pipe_file(join(root, LATEST), tag.encode())

    def read_latest(self) -> str | None:
        return None  # the staged copy's pointer says nothing about the store

    # Upload markers (checkpoint.async_upload): each rank says, on the store, that its files of
    # one save are uploaded and verified (or why not); rank 0 publishes once all of them are.
    # Outside the tags (``.uploads/<save>/``): a listing of tags never sees them.

    def put_marker(self, save_id: str, rank: int, note: dict[str, Any]) -> None:
        fs, root = self._fs()
        fs.pipe_file(join(root, UPLOADS, save_id, f"rank_{rank:05d}"), json.dumps(note).encode())

    def read_markers(self, save_id: str) -> dict[int, dict[str, Any]]:
        fs, root = self._fs()
        folder = join(root, UPLOADS, save_id)
        fs.invalidate_cache(folder)
        try:
            paths = fs.find(folder)
        except FileNotFoundError:
            return {}
        return {int(p.rsplit("_", 1)[-1]): json.loads(fs.cat_file(p)) for p in paths}

    def drop_markers(self, save_id: str) -> None:
        fs, root = self._fs()
        fs.rm(join(root, UPLOADS, save_id), recursive=True)


def storage_for(cfg: CheckpointConfig, run_dir: str | Path) -> CheckpointStorage:
    """The storage of ``checkpoint.dir``: remote for a URL of another filesystem."""
    if is_remote(cfg.dir):
        staging = os.path.expandvars(cfg.staging_dir) or str(Path(run_dir) / "checkpoint_staging")
        return RemoteStorage(cfg, Path(staging))
    return LocalStorage(cfg)
