"""Writing the on-storage dataset format (see docs/data-format.md): tar shards, then the index.

The index is written last and atomically: a dataset without an index does not exist, and a
crashed write never leaves an index that points at bytes that were not uploaded. Shard bytes are
a function of the clips added (fixed tar member metadata), like the index's.
"""

from __future__ import annotations

import array
import io
import os
import re
import shutil
import tarfile
import tempfile
from typing import Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from avts_dist.data.index import (
    CORE_COLUMNS,
    FORMAT_VERSION,
    INDEX_NAME,
    MEDIA_EXTS,
    SHARDS_DIR,
    DatasetError,
    DatasetIndex,
    canonical_url,
    open_dataset_fs,
    shard_name,
)
from avts_dist.data.probe import MediaInfo, probe_media
from avts_dist.storage import join

__all__ = ["ShardWriter"]

_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")

# Per-clip numeric columns the writer accumulates, as compact typed arrays (array module codes):
# a writer for AudioSet's 2M clips must not hold 2M Python dicts.
_WRITER_COLUMNS = {
    "shard": "i",
    "label": "i",
    "split": "b",
    "duration": "f",
    "fps": "f",
    "num_frames": "i",
    "has_video": "b",
    "has_audio": "b",
    "sample_rate": "i",
    "status": "b",
}


class ShardWriter:
    """Writes clips into tar shards of ``shard_size`` clips, then commits the index on close.

    Each shard is built in a local temporary file and uploaded whole (``fs.put_file``); member
    offsets come from ``tarfile`` itself. Within a shard the clips of each split lie contiguous
    (splits in the order they first appeared, clips in the order added; index rows keep the
    order added), so that block reads of one split do not fragment around the others'
    (docs/data-loading.md). Media members are probed with PyAV to fill the index.
    Existing ``index.npz`` at the URL is removed first, so a crash mid-write leaves no index at
    all rather than one describing shards that are being overwritten.
    """

    def __init__(
        self,
        url: str,
        *,
        shard_size: int,
        storage_options: dict[str, Any] | None = None,
        classes: list[str] | None = None,
        members: tuple[str, ...] = ("mp4", "json"),
        need_audio: bool = True,
        min_duration: float = 0.0,
        metadata: dict[str, Any] | None = None,
        profile: dict[str, Any] | None = None,
    ) -> None:
        if shard_size <= 0:
            raise DatasetError(f"shard_size must be > 0, got {shard_size}")
        self.url = canonical_url(url)
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = open_dataset_fs(url, storage_options)
        self.shard_size = shard_size
        self.classes = list(classes or [])
        self.members = list(members)
        self.need_audio = need_audio
        self.min_duration = min_duration
        self.metadata = dict(metadata or {})
        self.profile = dict(profile) if profile is not None else None
        self._keys: list[bytes] = []
        self._key_set: set[bytes] = set()
        self._cols = {name: array.array(code) for name, code in _WRITER_COLUMNS.items()}
        # Filled per shard when it is flushed (rows are flushed in order): [row * members + j].
        self._offset = array.array("q")
        self._size = array.array("q")
        self._extras: dict[str, list] = {}
        self._extra_kinds: dict[str, str] = {}
        self._splits: list[str] = []
        self._statuses: list[str] = ["ok"]
        self._shards: list[str] = []
        # The shard being built: one spool tar per split, joined in _flush_shard.
        self._tars: dict[str, tarfile.TarFile] = {}
        self._tar_rows: list[tuple[str, tuple[bool, ...]]] = []
        self._closed = False
        self._index: DatasetIndex | None = None
        self._prepare_destination()
        self._tmpdir = tempfile.mkdtemp(prefix="avts-shard-")

    def __len__(self) -> int:
        return len(self._keys)

    def _prepare_destination(self) -> None:
        index_path = join(self.root, INDEX_NAME)
        try:
            if self.fs.exists(index_path):
                self.fs.rm_file(index_path)
            # Only our own shard files go: anything else under the root is left alone.
            stale = self.fs.glob(join(self.root, SHARDS_DIR, "shard-*.tar"))
            if stale:
                self.fs.rm(stale)
            self.fs.makedirs(join(self.root, SHARDS_DIR), exist_ok=True)
        except Exception as exc:
            raise DatasetError(f"cannot write dataset at {self.url!r}: {exc}") from None

    def add(
        self,
        key: str,
        files: dict[str, bytes],
        label: int,
        split: str,
        **extra_scalar_columns: Any,
    ) -> dict[str, Any]:
        """Adds one clip; returns its probe results (duration, fps, ..., status)."""
        if self._closed:
            raise DatasetError("ShardWriter is closed")
        if not _KEY_RE.match(key):
            raise DatasetError(f"clip key {key!r} must match {_KEY_RE.pattern} (webdataset keys)")
        key_bytes = key.encode("utf-8")
        if key_bytes in self._key_set:
            raise DatasetError(f"duplicate clip key {key!r}")
        unknown = set(files) - set(self.members)
        if unknown:
            raise DatasetError(f"clip {key!r}: members {sorted(unknown)} not in {self.members}")
        # Everything that can reject the clip runs before it touches the shard.
        kinds = {
            name: self._extra_kind(name, value) for name, value in extra_scalar_columns.items()
        }
        media = [ext for ext in MEDIA_EXTS if ext in files]
        if media:
            info = probe_media(
                files[media[0]],
                need_video=media[0] == "mp4",
                need_audio=self.need_audio,
                min_duration=self.min_duration,
            ).as_dict()
        else:
            info = {**MediaInfo().as_dict(), "status": "no_media"}
        tar = self._split_tar(split)
        for ext in self.members:
            if ext in files:
                data = files[ext]
                tinfo = tarfile.TarInfo(f"{key}.{ext}")
                tinfo.size = len(data)
                # Fixed metadata so the same clips give the same shard bytes.
                tinfo.mtime, tinfo.mode, tinfo.uid, tinfo.gid = 0, 0o644, 0, 0
                tar.addfile(tinfo, io.BytesIO(data))
        self._record(key_bytes, int(label), split, info, extra_scalar_columns, kinds)
        self._tar_rows.append((key, tuple(ext in files for ext in self.members)))
        if len(self._tar_rows) >= self.shard_size:
            self._flush_shard()
        return info

    def _record(self, key_bytes, label, split, info, extras, kinds) -> None:
        if split not in self._splits:
            self._splits.append(split)
        if info["status"] not in self._statuses:
            self._statuses.append(info["status"])
        values = {
            **{name: info[name] for name in _WRITER_COLUMNS if name in info},
            "shard": len(self._shards),
            "label": label,
            "split": self._splits.index(split),
            "status": self._statuses.index(info["status"]),
        }
        for name, column in self._cols.items():
            column.append(values[name])
        row = len(self._keys)
        for name, kind in kinds.items():
            if name not in self._extras:
                self._extras[name] = [None] * row
            old = self._extra_kinds.setdefault(name, kind)
            if old != kind:  # int and float mix into float; _extra_kind rejected the rest
                self._extra_kinds[name] = "float"
        for name, column in self._extras.items():
            column.append(extras.get(name))
        self._keys.append(key_bytes)
        self._key_set.add(key_bytes)

    def _extra_kind(self, name: str, value: Any) -> str:
        if name in CORE_COLUMNS or not name.isidentifier():
            raise DatasetError(f"extra column name {name!r} is reserved or not an identifier")
        if isinstance(value, (bool, np.bool_)):
            kind = "bool"
        elif isinstance(value, (int, np.integer)):
            kind = "int"
        elif isinstance(value, (float, np.floating)):
            kind = "float"
        elif isinstance(value, str):
            kind = "str"
        else:
            raise DatasetError(
                f"extra column {name!r}: scalar expected, got {type(value).__name__}"
            )
        old = self._extra_kinds.get(name, kind)
        if old != kind and {old, kind} != {"int", "float"}:
            raise DatasetError(f"extra column {name!r} mixes {old} and {kind} values")
        return kind

    def _split_tar(self, split: str) -> tarfile.TarFile:
        if split not in self._tars:
            spool = os.path.join(self._tmpdir, f"spool-{len(self._tars)}.tar")
            self._tars[split] = tarfile.open(spool, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (closed per shard)
        return self._tars[split]

    def _join_spools(self) -> str:
        """The shard's tar: each split's members in one run, splits in index order."""
        local = os.path.join(self._tmpdir, "shard.tar")
        with tarfile.open(local, mode="w", format=tarfile.USTAR_FORMAT) as out:
            for split in sorted(self._tars, key=self._splits.index):
                self._tars[split].close()
                with tarfile.open(self._tars[split].name, mode="r") as spool:
                    for member in spool.getmembers():
                        out.addfile(member, spool.extractfile(member))
                os.remove(self._tars[split].name)
        self._tars = {}
        return local

    def _flush_shard(self) -> None:
        if not self._tars:
            return
        local = self._join_spools()
        # Offsets as tarfile reads them back, so they match what any tar reader sees.
        with tarfile.open(local, mode="r") as tf:
            where = {m.name: (m.offset_data, m.size) for m in tf.getmembers()}
        for key, present in self._tar_rows:
            for ext, there in zip(self.members, present, strict=True):
                off, size = where[f"{key}.{ext}"] if there else (-1, -1)
                self._offset.append(off)
                self._size.append(size)
        name = shard_name(len(self._shards))
        try:
            self.fs.put_file(local, join(self.root, name))
        except Exception as exc:
            raise DatasetError(f"cannot upload {join(self.url, name)}: {exc}") from None
        os.remove(local)
        self._shards.append(name)
        self._tar_rows = []

    def _columns(self) -> dict[str, np.ndarray]:
        num_rows, num_members = len(self._keys), len(self.members)
        max_key = max((len(k) for k in self._keys), default=1)
        cols: dict[str, np.ndarray] = {
            "key": np.array(self._keys, dtype=f"S{max_key}"),
            "offset": np.frombuffer(self._offset, np.int64).reshape(num_rows, num_members).copy(),
            "size": np.frombuffer(self._size, np.int64).reshape(num_rows, num_members).copy(),
        }
        for name, column in self._cols.items():
            cols[name] = np.frombuffer(column, dtype=column.typecode).astype(CORE_COLUMNS[name])
        for name, kind in self._extra_kinds.items():
            values = self._extras[name]
            if kind == "str":
                enc = [(v or "").encode() for v in values]
                cols[f"x_{name}"] = np.array(enc, dtype=f"S{max(1, *(len(e) for e in enc))}")
            else:
                fill = {"bool": False, "int": -1, "float": np.nan}[kind]
                dtype = {"bool": np.bool_, "int": np.int64, "float": np.float64}[kind]
                cols[f"x_{name}"] = np.array([fill if v is None else v for v in values], dtype)
        return cols

    def close(self) -> DatasetIndex:
        """Uploads the last shard, then commits the index (atomically) and returns it; a second
        call returns the same index."""
        if self._index is not None:
            return self._index
        if self._closed:
            raise DatasetError("ShardWriter was aborted; nothing was committed")
        self._flush_shard()
        self._closed = True
        header = {
            "format_version": FORMAT_VERSION,
            "classes": self.classes,
            "shards": self._shards,
            "splits": self._splits,
            "statuses": self._statuses,
            "members": self.members,
            "num_clips": len(self._keys),
            "extra_columns": dict(self._extra_kinds),
            "metadata": self.metadata,
            "profile": self.profile,
        }
        index = DatasetIndex(self._columns(), header, self.url, self.storage_options)
        _commit(self.fs, join(self.root, INDEX_NAME), index.to_bytes())
        shutil.rmtree(self._tmpdir, ignore_errors=True)
        self._index = index
        return index

    def abort(self) -> None:
        """Drops local temporaries; nothing is committed (uploaded shards stay unindexed)."""
        for tar in self._tars.values():
            tar.close()
        self._tars = {}
        self._closed = True
        shutil.rmtree(self._tmpdir, ignore_errors=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


def _commit(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Atomic publish: rename on local disk, a single PUT on object stores (an object is never
    visible half-written there)."""
    try:
        if isinstance(fs, LocalFileSystem):
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            fs.pipe_file(path, data)
    except Exception as exc:
        raise DatasetError(f"cannot commit index {path}: {exc}") from None
