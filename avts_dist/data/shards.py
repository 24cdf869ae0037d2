"""Tar shards plus one columnar index: the on-storage dataset format (see docs/data-format.md).

A dataset at ``<root>`` is ``<root>/shards/shard-NNNNNN.tar`` (webdataset member naming,
``<key>.mp4`` + ``<key>.json``) and ``<root>/index.npz``. The index records the byte offset and
size of every member, so one clip is one byte-range request. It is written last and atomically:
a dataset without an index does not exist, and a crashed write never leaves an index that points
at bytes that were not uploaded.
"""

from __future__ import annotations

import array
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import zipfile
from typing import Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from avts_dist.data.probe import MediaInfo, probe_media
from avts_dist.storage import StorageError, check_bucket, get_fs, join

__all__ = [
    "FORMAT_VERSION",
    "INDEX_NAME",
    "MEDIA_EXTS",
    "DatasetError",
    "DatasetIndex",
    "ShardWriter",
    "open_dataset_fs",
    "read_member",
    "shard_name",
]

FORMAT_VERSION = 1
INDEX_NAME = "index.npz"
SHARDS_DIR = "shards"
MEDIA_EXTS = ("mp4", "m4a", "wav")
_HEADER_MEMBER = "header"
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")

# Columns every index has, with their stored dtypes. Categorical columns (split, status) are
# stored as small integer codes plus their names in the header, and decoded on access.
_CORE_COLUMNS = {
    "key": "S",
    "shard": np.int32,
    "offset": np.int64,  # [N, num_members]; -1 where a member is absent
    "size": np.int64,  # [N, num_members]
    "label": np.int32,
    "split": np.int8,
    "duration": np.float32,
    "fps": np.float32,
    "num_frames": np.int32,
    "has_video": np.bool_,
    "has_audio": np.bool_,
    "sample_rate": np.int32,
    "status": np.int8,
}


class DatasetError(StorageError):
    """A dataset URL that cannot be read or written, with the reason in words."""


def shard_name(shard_id: int) -> str:
    return f"{SHARDS_DIR}/shard-{shard_id:06d}.tar"


def open_dataset_fs(
    url: str, storage_options: dict[str, Any] | None = None, *, must_exist: bool = True
) -> tuple[fsspec.AbstractFileSystem, str]:
    """``get_fs`` with dataset-level errors: bad URL, unreachable endpoint, missing bucket."""
    try:
        fs, root = get_fs(url, storage_options)
        root = root.rstrip("/") or root
        check_bucket(fs, root, url)
    except StorageError as exc:
        raise DatasetError(str(exc)) from None
    return fs, root


class DatasetIndex:
    """The columnar index of one dataset; every column is a numpy array of ``len(idx)`` rows."""

    def __init__(
        self,
        columns: dict[str, np.ndarray],
        header: dict[str, Any],
        url: str,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.header = header
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.classes: list[str] = list(header["classes"])
        self.shards: list[str] = list(header["shards"])
        self.splits: list[str] = list(header["splits"])
        self.statuses: list[str] = list(header["statuses"])
        self.members: list[str] = list(header["members"])
        self._columns = columns
        self._decoded: dict[str, np.ndarray] = {}
        self.key_bytes: np.ndarray = columns["key"]
        self.shard: np.ndarray = columns["shard"]
        self.offset: np.ndarray = columns["offset"]
        self.size: np.ndarray = columns["size"]
        self.label: np.ndarray = columns["label"]
        self.split_code: np.ndarray = columns["split"]
        self.duration: np.ndarray = columns["duration"]
        self.fps: np.ndarray = columns["fps"]
        self.num_frames: np.ndarray = columns["num_frames"]
        self.has_video: np.ndarray = columns["has_video"]
        self.has_audio: np.ndarray = columns["has_audio"]
        self.sample_rate: np.ndarray = columns["sample_rate"]
        self.status_code: np.ndarray = columns["status"]

    # Decoded views are built on first use: at AudioSet scale the fixed-width unicode copies
    # cost 4x the stored bytes, and most consumers only need row ids.
    @property
    def key(self) -> np.ndarray:
        if "key" not in self._decoded:
            try:
                self._decoded["key"] = self.key_bytes.astype(np.str_)
            except UnicodeDecodeError:
                self._decoded["key"] = np.char.decode(self.key_bytes, "utf-8")
        return self._decoded["key"]

    @property
    def split(self) -> np.ndarray:
        if "split" not in self._decoded:
            self._decoded["split"] = np.asarray(self.splits, dtype=np.str_)[self.split_code]
        return self._decoded["split"]

    @property
    def status(self) -> np.ndarray:
        if "status" not in self._decoded:
            self._decoded["status"] = np.asarray(self.statuses, dtype=np.str_)[self.status_code]
        return self._decoded["status"]

    def __len__(self) -> int:
        return int(self.key_bytes.shape[0])

    @property
    def extra_columns(self) -> list[str]:
        return list(self.header.get("extra_columns", {}))

    def column(self, name: str) -> np.ndarray:
        if name in ("key", "split", "status"):
            return getattr(self, name)
        if name in _CORE_COLUMNS:
            return self._columns[name]
        stored = self._columns.get(f"x_{name}")
        if stored is None:
            raise KeyError(f"index has no column {name!r} (columns: {self.column_names()})")
        if stored.dtype.kind == "S":
            return np.char.decode(stored, "utf-8")
        return stored

    def column_names(self) -> list[str]:
        return [*_CORE_COLUMNS, *self.extra_columns]

    def rows(self, split: str | None = None, status: str | None = "ok") -> np.ndarray:
        """Row ids (int64, ascending) in ``split`` (None: all) with ``status`` (None: any)."""
        mask = np.ones(len(self), dtype=bool)
        if split is not None:
            if split not in self.splits:
                return np.zeros(0, dtype=np.int64)
            mask &= self.split_code == self.splits.index(split)
        if status is not None:
            if status not in self.statuses:
                return np.zeros(0, dtype=np.int64)
            mask &= self.status_code == self.statuses.index(status)
        return np.flatnonzero(mask).astype(np.int64)

    def row_of(self, key: str) -> int:
        hits = np.flatnonzero(self.key_bytes == key.encode("utf-8"))
        if hits.size == 0:
            raise KeyError(key)
        return int(hits[0])

    def member(self, row: int, ext: str) -> tuple[str, int, int]:
        """``(shard_url, byte_offset, num_bytes)`` of member ``<key>.<ext>`` of ``row``."""
        if ext not in self.members:
            raise KeyError(f"no member .{ext} in this dataset (members: {self.members})")
        j = self.members.index(ext)
        offset = int(self.offset[row, j])
        if offset < 0:
            raise KeyError(f"clip {self.key[row]!r} has no .{ext} member")
        return join(self.url, self.shards[int(self.shard[row])]), offset, int(self.size[row, j])

    def media_ext(self, row: int) -> str:
        """The first media member present for ``row`` (mp4, then m4a, then wav)."""
        for ext in MEDIA_EXTS:
            if ext in self.members and self.offset[row, self.members.index(ext)] >= 0:
                return ext
        raise KeyError(f"clip {self.key[row]!r} has no media member")

    def open_fs(self) -> fsspec.AbstractFileSystem:
        return open_dataset_fs(self.url, self.storage_options)[0]

    def verify(self, fs: fsspec.AbstractFileSystem | None = None) -> list[str]:
        """Problems found checking that every shard exists and holds every byte the index
        points at (one listing per shard folder, no data read); empty when the dataset is whole."""
        fs = fs or self.open_fs()
        root = fs._strip_protocol(self.url)
        end = np.where(self.offset >= 0, self.offset + self.size, 0).max(axis=1, initial=0)
        needed = np.zeros(len(self.shards), dtype=np.int64)
        np.maximum.at(needed, self.shard, end)
        sizes: dict[str, int] = {}
        for folder in sorted({os.path.dirname(name) for name in self.shards}):
            try:
                listing = fs.ls(join(root, folder), detail=True)
            except FileNotFoundError:
                listing = []
            sizes |= {fs._strip_protocol(e["name"]): int(e.get("size") or 0) for e in listing}
        problems = []
        for shard_id, name in enumerate(self.shards):
            size = sizes.get(fs._strip_protocol(join(root, name)))
            if size is None:
                problems.append(f"{name}: missing")
            elif size < needed[shard_id]:
                problems.append(f"{name}: {size} bytes, index needs {int(needed[shard_id])}")
        return problems

    # ---- (de)serialization ----

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        header = json.dumps(self.header, sort_keys=True).encode("utf-8")
        arrays = {_HEADER_MEMBER: np.frombuffer(header, dtype=np.uint8), **self._columns}
        # Compressed: offsets and categorical codes shrink well, which matters for a 2M-row
        # index fetched over HTTP; inflating it costs well under a second.
        np.savez_compressed(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(
        cls, data: bytes | str, url: str, storage_options: dict[str, Any] | None = None
    ) -> DatasetIndex:
        where = f"{join(url, INDEX_NAME)}"
        source = io.BytesIO(data) if isinstance(data, bytes) else data
        if isinstance(data, bytes):
            magic = data[:4]
        else:
            with open(data, "rb") as f:
                magic = f.read(4)
        if magic != b"PK\x03\x04":
            raise DatasetError(f"malformed index {where}: not an npz (zip) archive")
        try:
            with np.load(source, allow_pickle=False) as npz:
                names = set(npz.files)
                if _HEADER_MEMBER not in names:
                    raise DatasetError(f"malformed index {where}: no header member")
                header = json.loads(npz[_HEADER_MEMBER].tobytes().decode("utf-8"))
                columns = {name: npz[name] for name in names if name != _HEADER_MEMBER}
        except DatasetError:
            raise
        except (zipfile.BadZipFile, ValueError, OSError, KeyError, EOFError) as exc:
            raise DatasetError(f"malformed index {where}: {exc}") from None
        if not isinstance(header, dict) or "format_version" not in header:
            raise DatasetError(f"malformed index {where}: header has no format_version")
        if header["format_version"] != FORMAT_VERSION:
            raise DatasetError(
                f"index {where} has format_version {header['format_version']}, this avts_dist "
                f"reads version {FORMAT_VERSION}; rewrite the dataset (avts synth / avts prepare)"
            )
        missing = [c for c in _CORE_COLUMNS if c not in columns]
        needed = ("classes", "shards", "splits", "statuses", "members")
        missing += [f"header.{h}" for h in needed if h not in header]
        if missing:
            raise DatasetError(f"malformed index {where}: missing {', '.join(missing)}")
        num_rows = columns["key"].shape[0]
        wrong = [n for n, a in columns.items() if a.shape[:1] != (num_rows,)]
        if wrong or columns["offset"].shape != (num_rows, len(header["members"])):
            raise DatasetError(f"malformed index {where}: columns {wrong or ['offset']} mismatch")
        return cls(columns, header, url, storage_options)

    @classmethod
    def load(cls, url: str, storage_options: dict[str, Any] | None = None) -> DatasetIndex:
        fs, root = open_dataset_fs(url, storage_options)
        path = join(root, INDEX_NAME)
        url = _canonical_url(url)
        try:
            if isinstance(fs, LocalFileSystem):
                # np.load on a path reads member by member, no whole-file copy in memory.
                if not os.path.exists(path):
                    raise FileNotFoundError(path)
                return cls.from_bytes(path, url, storage_options)
            data = fs.cat_file(path)
        except FileNotFoundError:
            hint = ""
            if fs.exists(join(root, SHARDS_DIR)):
                hint = " (shards exist but the dataset was never committed: an interrupted write?)"
            raise DatasetError(f"no dataset at {url!r}: {INDEX_NAME} not found{hint}") from None
        except DatasetError:
            raise
        except Exception as exc:
            raise DatasetError(f"cannot read {join(url, INDEX_NAME)}: {exc}") from None
        return cls.from_bytes(data, url, storage_options)


def read_member(fs: fsspec.AbstractFileSystem, idx: DatasetIndex, row: int, ext: str) -> bytes:
    """The bytes of one member, in one byte-range request."""
    shard_url, offset, size = idx.member(row, ext)
    path = fs._strip_protocol(shard_url)
    return fs.cat_file(path, start=offset, end=offset + size)


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


def _canonical_url(url: str) -> str:
    # Local paths become absolute so member URLs stay valid in processes with another cwd.
    return url.rstrip("/") if "://" in url else os.path.abspath(url)


class ShardWriter:
    """Writes clips into tar shards of ``shard_size`` clips, then commits the index on close.

    Each shard is built in a local temporary file and uploaded whole (``fs.put_file``); member
    offsets come from ``tarfile`` itself. Media members are probed with PyAV to fill the index.
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
    ) -> None:
        if shard_size <= 0:
            raise DatasetError(f"shard_size must be > 0, got {shard_size}")
        self.url = _canonical_url(url)
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = open_dataset_fs(url, storage_options)
        self.shard_size = shard_size
        self.classes = list(classes or [])
        self.members = list(members)
        self.need_audio = need_audio
        self.min_duration = min_duration
        self.metadata = dict(metadata or {})
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
        self._tar: tarfile.TarFile | None = None
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
        if self._tar is None:
            self._open_shard()
        assert self._tar is not None
        for ext in self.members:
            if ext in files:
                data = files[ext]
                tinfo = tarfile.TarInfo(f"{key}.{ext}")
                tinfo.size = len(data)
                # Fixed metadata so the same clips give the same shard bytes.
                tinfo.mtime, tinfo.mode, tinfo.uid, tinfo.gid = 0, 0o644, 0, 0
                self._tar.addfile(tinfo, io.BytesIO(data))
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
        if name in _CORE_COLUMNS or not name.isidentifier():
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

    def _open_shard(self) -> None:
        local = os.path.join(self._tmpdir, "shard.tar")
        self._tar = tarfile.open(local, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (closed per shard)
        self._tar_rows = []

    def _flush_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        local = self._tar.name
        self._tar = None
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
            cols[name] = np.frombuffer(column, dtype=column.typecode).astype(_CORE_COLUMNS[name])
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
        }
        index = DatasetIndex(self._columns(), header, self.url, self.storage_options)
        _commit(self.fs, join(self.root, INDEX_NAME), index.to_bytes())
        shutil.rmtree(self._tmpdir, ignore_errors=True)
        self._index = index
        return index

    def abort(self) -> None:
        """Drops local temporaries; nothing is committed (uploaded shards stay unindexed)."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
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
