"""Checkpoint references and listing: what a checkpoint folder holds, read without opening a
shard. Light on purpose (no trainer, no DeepSpeed, no collective): ``avts status``, ``avts
export`` and ``avts eval`` find checkpoints through this module alone."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from avts_dist.storage import StorageError, check_bucket, get_fs, is_remote, join

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "COMPLETE",
    "LATEST",
    "QUARANTINED",
    "CheckpointDamaged",
    "CheckpointError",
    "CheckpointRef",
    "check_reachable",
    "list_checkpoints",
    "list_quarantined",
    "manifest_bytes",
    "manifest_of",
    "read_meta",
    "resolve_checkpoint",
    "rng_file_name",
    "scan_tags",
    "tag_for",
]

CHECKPOINT_FORMAT_VERSION = 1
COMPLETE = "COMPLETE"
LATEST = "latest"
QUARANTINED = "QUARANTINED"
_TAG_RE = re.compile(r"^step_(\d+)$")
_QUARANTINED_RE = re.compile(r"^step_(\d+)\.quarantined-")


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, read or used; the message says which and why."""


class CheckpointDamaged(CheckpointError):
    """A checkpoint whose files do not match its manifest (or that has none). ``reason`` is the
    short slug of its quarantined name, ``detail`` says which file and how, in a few words."""

    def __init__(self, message: str, reason: str, detail: str) -> None:
        super().__init__(message)
        self.reason, self.detail = reason, detail


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


def rng_file_name(rank: int) -> str:
    return f"rng_rank_{rank:05d}.pt"


@dataclass(frozen=True)
class CheckpointRef:
    """One complete checkpoint tag: ``root`` (a local path or URL of the folder holding tags),
    ``tag`` and its ``COMPLETE`` meta."""

    root: str
    tag: str
    meta: dict[str, Any]
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def remote(self) -> bool:
        return is_remote(self.root)

    @property
    def url(self) -> str:
        return join(self.root, self.tag)

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def world_size(self) -> int:
        return int(self.meta["world_size"])

    @property
    def zero_stage(self) -> int:
        return int(self.meta.get("zero_stage", 0))


def read_meta(fs, marker: str) -> dict[str, Any] | None:
    """The ``COMPLETE`` marker at ``marker`` on ``fs``, or None when it is missing or unreadable."""
    try:
        meta = json.loads(fs.cat_file(marker))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and "step" in meta else None


def manifest_of(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{name: {"size": n, "sha256": hex}}`` of a ``COMPLETE`` meta; a manifest written before
    checksums (``{name: size}``) reads as sizes only."""
    return {
        name: dict(entry) if isinstance(entry, dict) else {"size": int(entry)}
        for name, entry in meta.get("files", {}).items()
    }


def manifest_bytes(meta: dict[str, Any]) -> int:
    return sum(entry["size"] for entry in manifest_of(meta).values())


def _names(url: str, storage_options: dict | None) -> tuple[Any, str, list[str]]:
    """``(fs, path, names of the entries directly under url)``; none for a missing folder."""
    fs, root = get_fs(url, storage_options)
    try:
        entries = fs.ls(root, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return fs, root, []
    return fs, root, [entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries]


def scan_tags(url: str, storage_options: dict | None) -> list[tuple[int, str, dict | None]]:
    """``(step, tag, COMPLETE meta or None)`` of every ``step_*`` folder under ``url``, oldest
    first: a folder without a readable marker is an unfinished save (or a damaged marker)."""
    fs, root, names = _names(url, storage_options)
    found = []
    for name in names:
        match = _TAG_RE.match(name)
        if match:
            found.append((int(match.group(1)), name, read_meta(fs, join(root, name, COMPLETE))))
    return sorted(found, key=lambda item: item[:2])


def list_checkpoints(url: str, storage_options: dict | None = None) -> list[CheckpointRef]:
    """The complete checkpoints directly under ``url``, oldest first (a missing folder: []).
    Quarantined tags (``step_*.quarantined-*``) are not checkpoints any more: never listed."""
    options = dict(storage_options or {})
    return [
        CheckpointRef(url.rstrip("/"), tag, meta, options)
        for _, tag, meta in scan_tags(url, options)
        if meta is not None
    ]


def list_quarantined(url: str, storage_options: dict | None = None) -> list[str]:
    """The names of the quarantined tags under ``url``."""
    _, _, names = _names(url, storage_options)
    return sorted(n for n in names if _QUARANTINED_RE.match(n))


def check_reachable(url: str, storage_options: dict | None) -> None:
    """An object store that does not answer, a missing bucket or refused credentials: one line."""
    if is_remote(url):
        fs, path = get_fs(url, storage_options)
        check_bucket(fs, path, url)


def resolve_checkpoint(url: str, storage_options: dict | None = None) -> CheckpointRef:
    """The checkpoint a path or URL names: a tag dir (with ``COMPLETE``), the newest complete tag
    of a checkpoints dir, or of ``<run dir>/checkpoints``. CheckpointError when there is none.
    The files are not read here: :func:`~avts_dist.train.checkpoint.fetch_checkpoint` verifies
    them."""
    url = url.rstrip("/")
    options = dict(storage_options or {})
    try:
        check_reachable(url, options)
        fs, path = get_fs(url, options)
        meta = read_meta(fs, join(path, COMPLETE))
        if meta is not None:
            root, _, tag = url.rpartition("/")
            return CheckpointRef(root or ".", tag, meta, options)
        if not fs.exists(path):
            raise CheckpointError(f"checkpoint not found: {url}")
        for candidate in (url, join(url, "checkpoints")):
            found = list_checkpoints(candidate, options)
            if found:
                return found[-1]
    except StorageError as exc:
        raise CheckpointError(str(exc)) from None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {url}: {exc}") from None
    raise CheckpointError(
        f"no complete checkpoint (a tag dir with {COMPLETE}) at {url} or under {url}/checkpoints"
    )
