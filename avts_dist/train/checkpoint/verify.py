"""Verification and fetch: a tag's files against its manifest (sizes, then sha256) before any of
them is read, and a verified local copy of a remote tag. Not collective."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from avts_dist.integrity import verify_files
from avts_dist.storage import StorageError, get_fs, join, local_path
from avts_dist.train.checkpoint.refs import (
    CHECKPOINT_FORMAT_VERSION,
    COMPLETE,
    CheckpointDamaged,
    CheckpointError,
    CheckpointRef,
    manifest_of,
)

__all__ = ["fetch_checkpoint", "is_valid", "validate"]


def validate(
    tag_dir: str | Path, meta: dict[str, Any] | None = None, *, label: str = ""
) -> dict[str, Any]:
    """Verifies a local tag before any of its files is read; returns its meta.

    The ``COMPLETE`` marker parses and names a known format, then every file of its manifest is
    there with its size (a stat each) and, only then, its sha256 (the files are read once).
    :class:`CheckpointDamaged` names the first file that does not match; ``label`` is the name
    used in messages (default: ``tag_dir``).
    """
    tag_dir = Path(tag_dir)
    label = label or str(tag_dir)
    try:
        on_disk = json.loads((tag_dir / COMPLETE).read_text())
        if not isinstance(on_disk, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise CheckpointDamaged(
            f"{label} is not a complete checkpoint ({COMPLETE}: {exc})",
            "no-manifest",
            f"no readable {COMPLETE} manifest",
        ) from None
    meta = meta or on_disk
    if on_disk.get("step") != meta.get("step"):
        detail = f"{COMPLETE} holds step {on_disk.get('step')}, not {meta.get('step')}"
        raise CheckpointDamaged(f"{label}: {detail}", "manifest-mismatch", detail)
    if meta.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{label}: checkpoint format_version {meta.get('format_version')!r}; this code "
            f"reads {CHECKPOINT_FORMAT_VERSION}"
        )
    problems = verify_files(tag_dir, manifest_of(meta))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        detail = f"{problems[0].text}{more}"
        reason = {"missing": "missing-file", "size": "size-mismatch"}.get(
            problems[0].kind, "sha256-mismatch"
        )
        raise CheckpointDamaged(f"checkpoint {label} is damaged: {detail}", reason, detail)
    return meta


def is_valid(tag_dir: Path, meta: dict[str, Any]) -> bool:
    try:
        validate(tag_dir, meta)
    except CheckpointError:
        return False
    return True


def fetch_checkpoint(ref: CheckpointRef, local_root: str | Path) -> Path:
    """A verified local copy of ``ref``: the folder holding ``ref.tag``. A local checkpoint is
    verified where it is; a remote one is downloaded into ``local_root`` (unless a copy there
    verifies already) and verified. Not collective: call it on one rank per filesystem.

    :class:`CheckpointDamaged` when the checkpoint does not match its manifest; a download that
    fails is a plain :class:`CheckpointError` (the checkpoint may well be fine)."""
    if not ref.remote:
        root = Path(local_path(ref.root))
        validate(root / ref.tag, ref.meta, label=ref.url)
        return root
    local_root = Path(local_root)
    if is_valid(local_root / ref.tag, ref.meta):
        return local_root
    tmp = local_root / f".download-{ref.tag}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fs, root = get_fs(ref.root, ref.storage_options or None)
        fs.get(join(root, ref.tag) + "/", str(tmp), recursive=True)
        validate(tmp, ref.meta, label=ref.url)
    except (OSError, StorageError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot download checkpoint {ref.url}: {exc}") from None
    except CheckpointError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(local_root / ref.tag, ignore_errors=True)
    os.replace(tmp, local_root / ref.tag)
    return local_root
