"""Reading the on-storage dataset format (see docs/data-format.md): the columnar index.

A dataset at ``<root>`` is ``<root>/shards/shard-NNNNNN.tar`` (webdataset member naming,
``<key>.mp4`` + ``<key>.json``) and ``<root>/index.npz``. The index records the byte offset and
size of every member, so one clip is one byte-range request. Writing lives in
:mod:`avts_dist.data.writer`.

The index serializes to the same bytes for the same content, whatever the clock or the storage:
zip entries carry a fixed timestamp and columns are stored in name order.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from typing import Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from avts_dist.storage import StorageError, check_bucket, get_fs, join

__all__ = [
    "CORE_COLUMNS",
    "FORMAT_VERSION",
    "INDEX_NAME",
    "MEDIA_EXTS",
    "SHARDS_DIR",
    "DatasetError",
    "DatasetIndex",
    "canonical_url",
    "open_dataset_fs",
    "read_member",
    "shard_name",
]

FORMAT_VERSION = 1
INDEX_NAME = "index.npz"
SHARDS_DIR = "shards"
MEDIA_EXTS = ("mp4", "m4a", "wav")
_HEADER_MEMBER = "header"
# Every zip entry of index.npz gets this timestamp (the zip epoch): np.savez stamps the wall
# clock, so two writes of the same index a second apart differed (issue 11's flake).
_ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)

# Columns every index has, with their stored dtypes. Categorical columns (split, status) are
# stored as small integer codes plus their names in the header, and decoded on access.
CORE_COLUMNS = {
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


def canonical_url(url: str) -> str:
    """Local paths become absolute, so member URLs stay valid in processes with another cwd."""
    return url.rstrip("/") if "://" in url else os.path.abspath(url)


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
    def profile(self) -> dict[str, Any] | None:
        """How the media was encoded (``avts prepare``'s profile); None when not recorded."""
        return self.header.get("profile")

    @property
    def extra_columns(self) -> list[str]:
        return list(self.header.get("extra_columns", {}))

    def column(self, name: str) -> np.ndarray:
        if name in ("key", "split", "status"):
            return getattr(self, name)
        if name in CORE_COLUMNS:
            return self._columns[name]
        stored = self._columns.get(f"x_{name}")
        if stored is None:
            raise KeyError(f"index has no column {name!r} (columns: {self.column_names()})")
        if stored.dtype.kind == "S":
            return np.char.decode(stored, "utf-8")
        return stored

    def column_names(self) -> list[str]:
        return [*CORE_COLUMNS, *self.extra_columns]

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
        """The ``.npz`` bytes: a function of the header and columns only (see module doc)."""
        header = json.dumps(self.header, sort_keys=True).encode("utf-8")
        arrays = {_HEADER_MEMBER: np.frombuffer(header, dtype=np.uint8)}
        arrays |= {name: self._columns[name] for name in sorted(self._columns)}
        return _npz_bytes(arrays)

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
        missing = [c for c in CORE_COLUMNS if c not in columns]
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
        url = canonical_url(url)
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


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """What ``np.savez_compressed`` writes, with fixed zip metadata. Compressed: offsets and
    categorical codes shrink well, which matters for a 2M-row index fetched over HTTP; inflating
    it costs well under a second."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, mode="w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
        for name, array in arrays.items():
            entry = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE_TIME)
            entry.compress_type = zipfile.ZIP_DEFLATED
            entry.external_attr = 0o644 << 16
            with zf.open(entry, mode="w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)
    return buf.getvalue()


def read_member(fs: fsspec.AbstractFileSystem, idx: DatasetIndex, row: int, ext: str) -> bytes:
    """The bytes of one member, in one byte-range request."""
    shard_url, offset, size = idx.member(row, ext)
    path = fs._strip_protocol(shard_url)
    return fs.cat_file(path, start=offset, end=offset + size)
