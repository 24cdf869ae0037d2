"""Resume planning: which checkpoint a run continues from (``resume=auto`` walks back to the
newest one that verifies, quarantining the rest), its verified local copy on every filesystem,
and DeepSpeed's universal form of it when the world size changed."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from avts_dist.distributed import collectives as C
from avts_dist.distributed.engine import convert_to_universal
from avts_dist.integrity import file_record
from avts_dist.storage import StorageError, atomic_write_text, local_path
from avts_dist.train.checkpoint.refs import (
    COMPLETE,
    CheckpointDamaged,
    CheckpointError,
    CheckpointRef,
    list_checkpoints,
    list_quarantined,
    resolve_checkpoint,
    rng_file_name,
    scan_tags,
)
from avts_dist.train.checkpoint.retention import Retention
from avts_dist.train.checkpoint.verify import fetch_checkpoint, is_valid

__all__ = ["ResumePlan", "older_than", "plan_resume"]

log = logging.getLogger("avts.train")


@dataclass(frozen=True)
class ResumePlan:
    """What a run resumes from, decided once and identical on every rank."""

    source: CheckpointRef
    # The local folder holding ``source.tag`` (fetched there when the source is remote).
    local_root: Path
    # The tag DeepSpeed loads: the source tag, or its universal form for a new world size.
    load_tag: str
    universal: bool
    same_world_size: bool

    def rng_file(self, rank: int) -> Path:
        return self.local_root / self.source.tag / rng_file_name(rank)

    def check_objective(self, objective: str) -> None:
        """ValueError when the source was trained with another ``train.objective``."""
        saved = self.source.meta.get("objective", "avts")
        if saved != objective:
            raise ValueError(
                f"resume: {self.source.url} was trained with train.objective={saved}, "
                f"this run has train.objective={objective}"
            )


def plan_resume(
    resume: str, retention: Retention, *, rank: int, world_size: int, fs_leader: bool
) -> ResumePlan | None:
    """Collective. ``resume``: ``none``, ``auto`` (the newest checkpoint of ``checkpoint.dir``
    that verifies, or a fresh start when there is none) or any path/URL
    :func:`resolve_checkpoint` takes (verified too; a mismatch is an error). Rank 0 decides and
    verifies; the first rank of each other filesystem fetches (and verifies) its copy."""
    if resume in ("", "none"):
        return None
    staging = retention.storage.local_root
    choice: CheckpointRef | None = None
    error = None
    if rank == 0:
        try:
            choice = _walk_back(retention) if resume == "auto" else _explicit(retention, resume)
        except (CheckpointError, StorageError, OSError) as exc:
            error = f"resume={resume}: {exc}"
    choice, error = C.broadcast_object((choice, error))
    if error:
        raise CheckpointError(error)
    if choice is None:
        return None
    error = None
    if fs_leader and rank != 0 and choice.remote:
        try:
            fetch_checkpoint(choice, staging)
        except CheckpointError as exc:
            error = str(exc)
    errors = [e for e in C.all_gather_object(error) if e]
    if errors:
        raise CheckpointError(errors[0])
    retention.verified.add(choice.tag)
    local_root = staging if choice.remote else Path(local_path(choice.root))
    same_world = choice.world_size == world_size
    universal = not same_world and choice.zero_stage > 0
    load_tag = universal_tag(local_root, choice.tag, fs_leader) if universal else choice.tag
    return ResumePlan(choice, local_root, load_tag, universal, same_world)


def older_than(ref: CheckpointRef) -> CheckpointRef | None:
    """The newest complete checkpoint before ``ref`` in its folder (not verified here)."""
    try:
        older = [r for r in list_checkpoints(ref.root, ref.storage_options) if r.step < ref.step]
    except (OSError, StorageError):
        return None
    return older[-1] if older else None


def _explicit(retention: Retention, resume: str) -> CheckpointRef:
    """Rank 0: ``resume=<path>``, verified; a damaged one is an error (and left as it is: the
    user named it)."""
    ref = resolve_checkpoint(resume, retention.storage.options)
    fetch_checkpoint(ref, retention.storage.local_root)
    return ref


def _damage_summary(skipped: list[tuple[str, str, str]]) -> str:
    return ", ".join(f"{tag} ({detail}) -> kept as {name}" for tag, detail, name in skipped)


def _walk_back(retention: Retention) -> CheckpointRef | None:
    """Rank 0: the newest checkpoint of ``checkpoint.dir`` that verifies. Each newer one is
    quarantined (kept, renamed) and named with its reason in one warning line."""
    storage = retention.storage
    skipped: list[tuple[str, str, str]] = []
    choice = None
    for _step, tag, meta in reversed(scan_tags(storage.url, storage.options)):
        if meta is None:
            reason, detail = "no-manifest", f"no readable {COMPLETE} manifest"
        else:
            ref = CheckpointRef(storage.url.rstrip("/"), tag, meta, dict(storage.options))
            try:
                fetch_checkpoint(ref, storage.local_root)
            except CheckpointDamaged as exc:
                reason, detail = exc.reason, exc.detail
            else:
                choice = ref
                break
        skipped.append((tag, detail, retention.quarantine(tag, reason, detail)))
    if choice is not None:
        if skipped:
            storage.point_latest(choice.tag)
            log.warning(
                "resume=auto: skipped %s; resuming from %s", _damage_summary(skipped), choice.tag
            )
        return choice
    quarantined = list_quarantined(storage.url, storage.options)
    if skipped or any("nonfinite" not in name for name in quarantined):
        what = (
            f"skipped {_damage_summary(skipped)}"
            if skipped
            else (f"it holds only quarantined ones: {', '.join(quarantined[-3:])}")
        )
        raise CheckpointError(
            f"no checkpoint in {storage.url} verifies ({what}): resume=none starts afresh, "
            "resume=<tag dir> loads one of them anyway"
        )
    return None


def universal_tag(root: Path, tag: str, fs_leader: bool) -> str:
    """Collective: DeepSpeed's universal form of ``tag`` (``ds_to_universal``, converted once per
    filesystem by its first rank, then reused while it verifies)."""
    utag = f"{tag}_universal"
    if fs_leader and not is_valid(root / utag, {}):
        t0 = time.perf_counter()
        tmp = root / f".tmp-{utag}"
        shutil.rmtree(tmp, ignore_errors=True)
        convert_to_universal(root / tag, tmp)
        meta = json.loads((root / tag / COMPLETE).read_text())
        for rng in (root / tag).glob("rng_rank_*.pt"):
            shutil.copy(rng, tmp / rng.name)
        meta["files"] = {
            p.relative_to(tmp).as_posix(): file_record(p).as_json()
            for p in tmp.rglob("*")
            if p.is_file()
        }
        atomic_write_text(tmp / COMPLETE, json.dumps(meta, indent=1))
        shutil.rmtree(root / utag, ignore_errors=True)
        os.replace(tmp, root / utag)
        log.info(
            "converted %s to DeepSpeed's universal checkpoint in %.1fs (world size change)",
            tag,
            time.perf_counter() - t0,
        )
    C.barrier()
    return utag
