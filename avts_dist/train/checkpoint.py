"""The checkpoint component: find, verify, fetch, convert and save complete-or-invisible sharded
checkpoints, on local disk or behind an fsspec URL; quarantine the damaged ones, never delete them.

Layout of ``checkpoint.dir``::

    step_000040/              one tag: DeepSpeed's shards (their names are engine.py's business),
        rng_rank_00000.pt     per-rank RNG states,
        COMPLETE              JSON: step, world_size, zero_stage, ..., and ``files``, the manifest
                              of every rank's files: ``{name: {"size": n, "sha256": hex}}``
    step_000040_universal/    DeepSpeed's universal form, made on demand for a new world size
    step_000030.quarantined-sha256-mismatch/
                              a tag that failed verification, renamed (with a ``QUARANTINED``
                              note saying why); ``.quarantined-nonfinite``: the state a run
                              stopped on after non-finite losses, kept for debugging
    latest                    the newest published tag (DeepSpeed's pointer file)

**Saving.** Every rank writes into the hidden tag ``.tmp-step_000040``, taking each file's size
and sha256 from the bytes on their way to the disk (``avts_dist.integrity``: no second read), and
reports them; rank 0 confirms every file (a stat, or one listing of the remote tag), writes
``COMPLETE`` into the tag and only then renames it and rewrites ``latest``. A kill at any point
leaves the previous checkpoint the newest; ``.tmp-*`` leftovers are removed at the next save.
Before writing, the free space is checked against the previous checkpoint's size (or an
estimate); a full disk during the write is the same one-line error, the partial tag is removed and
``latest`` stays. The first save after a resume reads back what it wrote and compares hashes.

**Verifying.** :func:`validate` checks the marker, then every file's size (a stat), then every
file's sha256, before any file of a tag is read: resume, export and evaluation all go through
:func:`fetch_checkpoint`, which verifies. ``resume=auto`` walks back from the newest tag to the
newest one that verifies; each one it skips is quarantined (renamed ``<tag>.quarantined-<reason>``,
kept) and named, with its reason, in one warning line. Keep-last counts only tags that verify.

Remote destinations (``s3://...``): DeepSpeed writes to a local staging folder
(``checkpoint.staging_dir``, default ``<run.dir>/checkpoint_staging``), then every rank uploads the
files it wrote and rank 0 writes ``COMPLETE`` once all of them are listed remotely. The staging
folder may be node-local: the ranks find out which of them share a filesystem, and to resume, the
first rank of each filesystem fetches the remote tag (so every node has it). An endpoint that does
not answer is reported at start (``storage.check_bucket``), not at the first save.

Resume (:meth:`CheckpointManager.plan_resume`) returns a typed :class:`ResumePlan`;
:func:`resolve_checkpoint` turns any path or URL (run dir, checkpoints dir, tag dir, ``s3://``,
``file://``) into a :class:`CheckpointRef`, which export and evaluation use too.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avts_dist.config import CheckpointConfig
from avts_dist.distributed import collectives as C
from avts_dist.distributed.engine import (
    convert_to_universal,
    estimate_checkpoint_bytes,
    save_engine_checkpoint,
)
from avts_dist.integrity import (
    FileRecord,
    file_record,
    format_bytes,
    save_torch,
    stream_record,
    verify_files,
)
from avts_dist.storage import (
    StorageError,
    atomic_write_text,
    check_bucket,
    get_fs,
    is_remote,
    join,
    local_path,
)

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "COMPLETE",
    "QUARANTINED",
    "CheckpointDamaged",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointRef",
    "ResumePlan",
    "fetch_checkpoint",
    "get_rng_state",
    "list_checkpoints",
    "list_quarantined",
    "manifest_of",
    "resolve_checkpoint",
    "set_rng_state",
    "tag_for",
    "validate",
]

log = logging.getLogger("avts.train")

CHECKPOINT_FORMAT_VERSION = 1
COMPLETE = "COMPLETE"
LATEST = "latest"
QUARANTINED = "QUARANTINED"
_TAG_RE = re.compile(r"^step_(\d+)$")
_QUARANTINED_RE = re.compile(r"^step_(\d+)\.quarantined-")


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, read or used; the message says which and why."""


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


# ---------------------------------------------------------------------------------------------
# Finding and verifying


class CheckpointDamaged(CheckpointError):
    """A checkpoint whose files do not match its manifest (or that has none). ``reason`` is the
    short slug of its quarantined name, ``detail`` says which file and how, in a few words."""

    def __init__(self, message: str, reason: str, detail: str) -> None:
        super().__init__(message)
        self.reason, self.detail = reason, detail


def _read_meta(fs, marker: str) -> dict[str, Any] | None:
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


def _scan_tags(url: str, storage_options: dict | None) -> list[tuple[int, str, dict | None]]:
    """``(step, tag, COMPLETE meta or None)`` of every ``step_*`` folder under ``url``, oldest
    first: a folder without a readable marker is an unfinished save (or a damaged marker)."""
    fs, root = get_fs(url, storage_options)
    try:
        entries = fs.ls(root, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for entry in entries:
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        match = _TAG_RE.match(name)
        if match:
            found.append((int(match.group(1)), name, _read_meta(fs, join(root, name, COMPLETE))))
    return sorted(found, key=lambda item: item[:2])


def list_checkpoints(url: str, storage_options: dict | None = None) -> list[CheckpointRef]:
    """The complete checkpoints directly under ``url``, oldest first (a missing folder: []).
    Quarantined tags (``step_*.quarantined-*``) are not checkpoints any more: never listed."""
    options = dict(storage_options or {})
    return [
        CheckpointRef(url.rstrip("/"), tag, meta, options)
        for _, tag, meta in _scan_tags(url, options)
        if meta is not None
    ]


def list_quarantined(url: str, storage_options: dict | None = None) -> list[str]:
    """The names of the quarantined tags under ``url``."""
    fs, root = get_fs(url, storage_options)
    try:
        entries = fs.ls(root, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    names = (e.rstrip("/").rsplit("/", 1)[-1] for e in entries)
    return sorted(n for n in names if _QUARANTINED_RE.match(n))


def _check_reachable(url: str, storage_options: dict | None) -> None:
    """An object store that does not answer, a missing bucket or refused credentials: one line."""
    if is_remote(url):
        fs, path = get_fs(url, storage_options)
        check_bucket(fs, path, url)


def resolve_checkpoint(url: str, storage_options: dict | None = None) -> CheckpointRef:
    """The checkpoint a path or URL names: a tag dir (with ``COMPLETE``), the newest complete tag
    of a checkpoints dir, or of ``<run dir>/checkpoints``. CheckpointError when there is none.
    The files are not read here: :func:`fetch_checkpoint` verifies them."""
    url = url.rstrip("/")
    options = dict(storage_options or {})
    try:
        _check_reachable(url, options)
        fs, path = get_fs(url, options)
        meta = _read_meta(fs, join(path, COMPLETE))
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


def _is_valid(tag_dir: Path, meta: dict[str, Any]) -> bool:
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
    if _is_valid(local_root / ref.tag, ref.meta):
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


# ---------------------------------------------------------------------------------------------
# RNG state


def get_rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------
# The manager: every method is collective (called on every rank)


def _filesystem_group(root: Path, rank: int) -> tuple[bool, int, int]:
    """Whether this rank is the first of the ranks sharing ``root``'s filesystem, how many
    filesystems the ranks see, and how many ranks share this one. Each rank drops a probe file;
    a rank sees the probes of the ranks on its filesystem (a shared one, or its node's disk)."""
    root.mkdir(parents=True, exist_ok=True)
    token = C.broadcast_object(uuid.uuid4().hex)
    probe = root / f".probe-{token}-{rank}"
    probe.touch()
    C.barrier()
    seen = [int(p.name.rsplit("-", 1)[1]) for p in root.glob(f".probe-{token}-*")]
    C.barrier()
    probe.unlink()
    leaders = C.all_gather_object(min(seen))
    return min(seen) == rank, len(set(leaders)), len(seen)


def _damage_summary(skipped: list[tuple[str, str, str]]) -> str:
    return ", ".join(f"{tag} ({detail}) -> kept as {name}" for tag, detail, name in skipped)


class CheckpointManager:
    """Saves checkpoints and plans resumes for one run; every method is collective.

    ``on_event(name, step)`` is called at fixed points of a save: ``"after_space_check"`` (the
    free space was found sufficient, nothing written yet) and ``"after_shards"`` (every rank's
    files written, nothing published yet); tests install it to fill the disk or kill a run.
    """

    def __init__(
        self,
        cfg: CheckpointConfig,
        *,
        run_dir: str | Path,
        rank: int,
        world_size: int,
        on_event: Callable[[str, int], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.on_event = on_event or (lambda name, step: None)
        self.remote = is_remote(cfg.dir)
        self.options = dict(cfg.storage_options or {})
        staging = os.path.expandvars(cfg.staging_dir) or str(Path(run_dir) / "checkpoint_staging")
        self.local_root = Path(staging) if self.remote else Path(local_path(cfg.dir))
        self.fs_leader, num_filesystems, self.num_ranks_here = _filesystem_group(
            self.local_root, rank
        )
        if num_filesystems > 1 and not self.remote:
            raise CheckpointError(
                f"checkpoint.dir={cfg.dir} is not one filesystem for all ranks (they see "
                f"{num_filesystems}): use a shared filesystem or an s3:// checkpoint.dir"
            )
        if self.remote:
            error = None
            if rank == 0:
                try:
                    _check_reachable(cfg.dir, self.options)
                except StorageError as exc:
                    error = f"checkpoint.dir={cfg.dir}: {exc}"
            error = C.broadcast_object(error)
            if error:
                raise CheckpointError(error)
        self.last_save_s = 0.0
        self.last_save_bytes = 0
        # The tag `latest` names, once this run knows it (resumed from, or saved).
        self.latest: str | None = None
        # After a resume the first save reads back what it wrote: a new machine, disk or bucket
        # shows a fault at once, not at the next resume.
        self.verify_next_save = False
        self._verified: set[str] = set()  # tags this process wrote or verified
        self._space_needed = (0, "")

    def _remote_fs(self):
        return get_fs(self.cfg.dir, self.options or None)

    # ---- save ----

    def save(
        self,
        engine,
        step: int,
        client_state: dict[str, Any],
        meta: dict[str, Any],
        *,
        quarantine: str = "",
    ) -> str:
        """Writes tag ``step_XXXXXX`` and publishes it (``latest``) once every rank's files are
        confirmed; returns the tag. ``quarantine="nonfinite"``: the state is kept, complete, as
        ``step_XXXXXX.quarantined-nonfinite`` for debugging, and never becomes ``latest``."""
        t0 = time.perf_counter()
        tag, root = tag_for(step), self.local_root
        tmp_tag = f".tmp-{tag}"
        dest = None
        if self.rank == 0:
            dest = self._free_name(f"{tag}.quarantined-{quarantine}") if quarantine else tag
        if self.fs_leader:
            for stale in root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        dest = C.broadcast_object(dest)
        self._check_space(tag, engine)
        self.on_event("after_space_check", step)
        mine, error = self._write_part(engine, root / tmp_tag, dest, client_state)
        parts = C.all_gather_object((mine, error))
        errors = [e for _, e in parts if e]
        if errors:
            self._discard(root / tmp_tag, dest)
            raise CheckpointError(f"checkpoint {tag} not saved: {errors[0]}; {self._latest_note()}")
        files: dict[str, dict[str, Any]] = {}
        for part, _ in parts:
            files.update(part)
        self.on_event("after_shards", step)
        full_meta = {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "tag": tag,
            "step": step,
            "world_size": self.world_size,
            "time": time.time(),
            **meta,
            "checksum": "sha256 of each file, taken while it was written",
            "files": files,
        }
        problem = self._confirm(root / tmp_tag, dest, files) if self.rank == 0 else None
        problem = C.broadcast_object(problem)
        if problem:
            self._discard(root / tmp_tag, dest)
            raise CheckpointError(f"checkpoint {tag} not published: {problem}")
        error = self._publish(root / tmp_tag, dest, full_meta, quarantine)
        errors = [e for e in C.all_gather_object(error) if e]
        if errors:
            self._discard(root / tmp_tag, dest)
            raise CheckpointError(
                f"checkpoint {tag} not published: {errors[0]}; {self._latest_note()}"
            )
        self.last_save_bytes = manifest_bytes(full_meta)
        self.last_save_s = time.perf_counter() - t0
        if not quarantine:
            self.latest = tag
            self._verified.add(tag)
            self.verify_next_save = False
            self._retain(tag)
        return dest

    def _publish(self, tmp: Path, dest: str, meta: dict[str, Any], quarantine: str) -> str | None:
        """Writes the marker (and ``latest`` unless quarantined): on the store by rank 0 when
        remote, on each filesystem by its first rank. Returns what failed, if anything: a full
        disk here is the same one line as during the write."""
        note = {"reason": quarantine, "detail": "saved when the run stopped on it"}
        if self.remote and self.rank == 0:
            try:
                fs, remote_root = self._remote_fs()
                if quarantine:
                    fs.pipe_file(join(remote_root, dest, QUARANTINED), json.dumps(note).encode())
                # The marker last: a reader that sees it sees every file.
                fs.pipe_file(join(remote_root, dest, COMPLETE), json.dumps(meta, indent=1).encode())
                if not quarantine:
                    fs.pipe_file(join(remote_root, LATEST), dest.encode())
            except (OSError, StorageError) as exc:
                return f"cannot write {join(self.cfg.dir, dest, COMPLETE)}: {exc}"
        if self.fs_leader:
            try:
                self._publish_local(tmp, dest, meta, note if quarantine else None)
            except OSError as exc:
                if not self.remote:
                    return self._write_error(exc, self.local_root / dest)
                # The remote copy is the checkpoint; a staged copy is only a cache.
                log.warning("staged copy of %s not kept: %s", dest, exc)
                shutil.rmtree(tmp, ignore_errors=True)
        return None

    def _write_part(
        self, engine, tmp_dir: Path, dest: str, client_state: dict[str, Any]
    ) -> tuple[dict[str, dict[str, Any]], str | None]:
        """This rank's files: DeepSpeed's shards and its RNG file, each with size and sha256
        (uploaded when remote, and read back after a resume); or the error that stopped them."""
        outcome = save_engine_checkpoint(engine, self.local_root, tmp_dir.name, client_state)
        if outcome.error is not None:
            return {}, self._write_error(outcome.error, tmp_dir / outcome.error_file)
        records = dict(outcome.records)
        rng_name = rng_file_name(self.rank)
        try:
            records[rng_name] = save_torch(get_rng_state(), tmp_dir / rng_name)
        except OSError as exc:
            return {}, self._write_error(exc, tmp_dir / rng_name)
        try:
            if self.remote:
                self._upload(tmp_dir, dest, records)
            if self.verify_next_save:
                problem = self._read_back(tmp_dir, dest, records)
                if problem:
                    return {}, problem
        except (OSError, StorageError) as exc:
            where = join(self.cfg.dir, dest) if self.remote else str(tmp_dir)
            return {}, f"cannot write {where}: {exc}"
        return {name: record.as_json() for name, record in records.items()}, None

    def _read_back(self, tmp_dir: Path, dest: str, records: dict[str, FileRecord]) -> str | None:
        """The files as stored (the remote copy when remote; else from the disk, past the page
        cache) against the size and sha256 taken while writing them."""
        if self.remote:
            fs, remote_root = self._remote_fs()
            stored = {}
            for name in records:
                with fs.open(join(remote_root, dest, name), "rb") as f:
                    stored[name] = stream_record(f)
        else:
            stored = {name: file_record(tmp_dir / name, from_disk=True) for name in records}
        bad = sorted(name for name, record in records.items() if stored[name] != record)
        if bad:
            where = join(self.cfg.dir, dest) if self.remote else str(tmp_dir)
            return f"read back from {where}, {bad[0]} differs from what was written"
        return None

    def _check_space(self, tag: str, engine) -> None:
        """Refuses a save the free space cannot hold, before anything is written. The size is the
        previous checkpoint's (this run's last save, or the one it resumed from), else an
        estimate from the model and optimizer; each filesystem needs its ranks' share."""
        if self.last_save_bytes:
            total, basis = self.last_save_bytes, "the size of the previous checkpoint"
        else:
            total = estimate_checkpoint_bytes(engine)
            basis = "estimated from the model and optimizer sizes"
        needed = total * self.num_ranks_here // self.world_size
        self._space_needed = (needed, basis)
        problem = None
        if self.fs_leader:
            free = shutil.disk_usage(self.local_root).free
            if free < needed:
                problem = (
                    f"not enough space for checkpoint {tag} in {self.local_root}: "
                    f"{format_bytes(free)} free, about {format_bytes(needed)} needed ({basis})"
                )
        problems = [p for p in C.all_gather_object(problem) if p]
        if problems:
            raise CheckpointError(f"{problems[0]}; nothing written, {self._latest_note()}")

    def _write_error(self, exc: OSError, path: Path) -> str:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            needed, basis = self._space_needed
            try:
                free = format_bytes(shutil.disk_usage(self.local_root).free)
            except OSError:
                free = "unknown"
            return (
                f"no space left on device writing {path}: {free} free there, about "
                f"{format_bytes(needed)} needed for this checkpoint ({basis})"
            )
        return f"cannot write {path}: {exc.strerror or exc}"

    def _latest_note(self) -> str:
        latest = self.latest
        if latest is None and not self.remote and (self.local_root / LATEST).is_file():
            latest = (self.local_root / LATEST).read_text().strip()
        return f"latest stays {latest}" if latest else "no checkpoint was published before"

    def _discard(self, tmp_dir: Path, dest: str) -> None:
        """A save that failed leaves nothing: its temporary folder, and its partial upload."""
        if self.fs_leader:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        if self.remote and self.rank == 0:
            with contextlib.suppress(OSError, StorageError):
                fs, remote_root = self._remote_fs()
                fs.rm(join(remote_root, dest), recursive=True)
        C.barrier()

    def _upload(self, local_tag_dir: Path, dest: str, files: dict[str, Any]) -> None:
        fs, remote_root = self._remote_fs()
        for name in sorted(files):
            fs.put_file(str(local_tag_dir / name), join(remote_root, dest, name))

    def _confirm(self, local_tag_dir: Path, dest: str, files: dict[str, Any]) -> str | None:
        """Rank 0: every rank's file is there with its size (the remote copy when remote)."""
        if self.remote:
            fs, remote_root = self._remote_fs()
            prefix = join(remote_root, dest) + "/"
            try:
                listing = fs.find(prefix, detail=True)
            except FileNotFoundError:
                listing = {}
            sizes = {p.split(prefix, 1)[-1]: info["size"] for p, info in listing.items()}
        else:
            sizes = {
                name: (local_tag_dir / name).stat().st_size
                for name in files
                if (local_tag_dir / name).is_file()
            }
        expected = {name: entry["size"] for name, entry in manifest_of({"files": files}).items()}
        bad = [
            f"{n} ({sizes.get(n)} of {s} bytes)" for n, s in expected.items() if sizes.get(n) != s
        ]
        return f"files not confirmed: {', '.join(sorted(bad)[:5])}" if bad else None

    def _publish_local(
        self, tmp: Path, dest: str, meta: dict[str, Any], note: dict[str, str] | None
    ) -> None:
        """This filesystem's copy becomes ``dest`` when it holds every file (a shared
        filesystem), its marker written before the rename so that a ``step_*`` folder is always
        complete; a node-local part of a remote checkpoint is dropped (the remote copy is)."""
        root = self.local_root
        if not all((tmp / name).is_file() for name in meta["files"]):
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if note is not None:
            atomic_write_text(tmp / QUARANTINED, json.dumps(note))
        atomic_write_text(tmp / COMPLETE, json.dumps(meta, indent=1))
        final = root / dest
        if final.exists():  # the same step saved again (e.g. a resume that went back further)
            shutil.rmtree(final)
        os.replace(tmp, final)
        if note is None:
            atomic_write_text(root / LATEST, dest)

    # ---- quarantine and retention ----

    def _free_name(self, name: str) -> str:
        """``name``, or ``name.2``, ``name.3``... when a quarantined tag has it already."""
        if self.remote:
            taken = set(list_quarantined(self.cfg.dir, self.options))
        else:
            taken = {p.name for p in self.local_root.glob(f"{name}*")}
        candidate, n = name, 1
        while candidate in taken:
            n += 1
            candidate = f"{name}.{n}"
        return candidate

    def _quarantine(self, tag: str, reason: str, detail: str) -> str:
        """Rank 0: renames ``tag`` to ``tag.quarantined-<reason>`` (never deleted), with a
        ``QUARANTINED`` note saying why; returns the new name."""
        name = self._free_name(f"{tag}.quarantined-{reason}")
        note = json.dumps({"reason": reason, "detail": detail, "time": time.time()})
        if self.remote:
            fs, remote_root = self._remote_fs()
            # File by file: an object store has no rename of a prefix (and fsspec's recursive mv
            # trips over the prefix itself on S3).
            source = join(remote_root, tag)
            for path in fs.find(source):
                fs.copy(path, join(remote_root, name, path[len(source) :]))
            fs.rm(source, recursive=True)
            fs.pipe_file(join(remote_root, name, QUARANTINED), note.encode())
            fs.invalidate_cache(remote_root)
            shutil.rmtree(self.local_root / tag, ignore_errors=True)  # a staged copy of it
        else:
            os.replace(self.local_root / tag, self.local_root / name)
            atomic_write_text(self.local_root / name / QUARANTINED, note)
        # Its universal form was made from the same damaged files.
        shutil.rmtree(self.local_root / f"{tag}_universal", ignore_errors=True)
        return name

    def _point_latest(self, tag: str) -> None:
        if self.remote:
            fs, remote_root = self._remote_fs()
            fs.pipe_file(join(remote_root, LATEST), tag.encode())
        else:
            atomic_write_text(self.local_root / LATEST, tag)

    def _verifies(
        self, ref: CheckpointRef, sizes: dict[str, int] | None
    ) -> CheckpointDamaged | None:
        """None when ``ref`` verifies (this process verified it already, or it does now: the
        files' sizes and hashes locally; the sizes of a remote listing), else the damage."""
        if ref.tag in self._verified:
            return None
        if sizes is None:
            try:
                validate(self.local_root / ref.tag, ref.meta, label=ref.url)
            except CheckpointDamaged as exc:
                return exc
        else:
            for name, entry in sorted(manifest_of(ref.meta).items()):
                if sizes.get(name) != entry["size"]:
                    detail = (
                        f"{name} has {sizes.get(name)} bytes, the manifest says {entry['size']}"
                    )
                    return CheckpointDamaged(detail, "size-mismatch", detail)
        self._verified.add(ref.tag)
        return None

    def _retain(self, newest: str) -> None:
        """Keeps the newest ``checkpoint.keep_last`` checkpoints that verify, ``newest`` (just
        published) first; deletes older ones. One that does not verify is quarantined, not
        counted. Rank 0 for a remote dir, each filesystem's first rank for its local copies.
        Failures here are logged: a checkpoint is already safe."""
        keep = self.cfg.keep_last
        try:
            if self.remote and self.rank == 0:
                fs, remote_root = self._remote_fs()
                refs = list_checkpoints(self.cfg.dir, self.options)
                for ref in self._retention_order(refs, newest):
                    if keep > 0:
                        prefix = join(remote_root, ref.tag) + "/"
                        listing = fs.find(prefix, detail=True)
                        sizes = {p.split(prefix, 1)[-1]: i["size"] for p, i in listing.items()}
                        damage = self._verifies(ref, sizes)
                        if damage is None:
                            keep -= 1
                        else:
                            self._quarantine_at_retention(ref.tag, damage)
                    else:
                        fs.rm(join(remote_root, ref.tag), recursive=True)
            if self.fs_leader:
                # Local: the checkpoints themselves; remote: staged copies, kept as many.
                keep = self.cfg.keep_last
                refs = list_checkpoints(str(self.local_root))
                for ref in self._retention_order(refs, newest):
                    if keep > 0 and self.remote:
                        keep -= 1
                    elif keep > 0:
                        damage = self._verifies(ref, None)
                        if damage is None:
                            keep -= 1
                        else:
                            self._quarantine_at_retention(ref.tag, damage)
                    else:
                        shutil.rmtree(self.local_root / ref.tag, ignore_errors=True)
                        shutil.rmtree(self.local_root / f"{ref.tag}_universal", ignore_errors=True)
        except (OSError, StorageError, CheckpointError) as exc:
            log.warning("keep-last retention after %s skipped: %s", newest, exc)

    def _quarantine_at_retention(self, tag: str, damage: CheckpointDamaged) -> None:
        name = self._quarantine(tag, damage.reason, damage.detail)
        log.warning("keep-last: %s does not verify (%s), kept as %s", tag, damage.detail, name)

    @staticmethod
    def _retention_order(refs: list[CheckpointRef], newest: str) -> list[CheckpointRef]:
        """The tag just published first, whatever its step (a resume from an older checkpoint
        may leave higher steps behind), then the rest newest first."""
        return sorted(refs, key=lambda r: (r.tag != newest, -r.step))

    # ---- resume ----

    def plan_resume(self, resume: str) -> ResumePlan | None:
        """``resume``: ``none``, ``auto`` (the newest checkpoint of ``checkpoint.dir`` that
        verifies, or a fresh start when there is none) or any path/URL
        :func:`resolve_checkpoint` takes (verified too; a mismatch is an error). Rank 0 decides
        and verifies; the first rank of each other filesystem fetches (and verifies) its copy."""
        if resume in ("", "none"):
            return None
        choice: CheckpointRef | None = None
        error = None
        if self.rank == 0:
            try:
                choice = self._walk_back() if resume == "auto" else self._explicit(resume)
            except (CheckpointError, StorageError, OSError) as exc:
                error = f"resume={resume}: {exc}"
        choice, error = C.broadcast_object((choice, error))
        if error:
            raise CheckpointError(error)
        if choice is None:
            return None
        error = None
        if self.fs_leader and self.rank != 0 and choice.remote:
            try:
                fetch_checkpoint(choice, self.local_root)
            except CheckpointError as exc:
                error = str(exc)
        errors = [e for e in C.all_gather_object(error) if e]
        if errors:
            raise CheckpointError(errors[0])
        local_root = self.local_root if choice.remote else Path(local_path(choice.root))
        self.latest = choice.tag
        self._verified.add(choice.tag)
        self.verify_next_save = True
        self.last_save_bytes = manifest_bytes(choice.meta)
        same_world = choice.world_size == self.world_size
        universal = not same_world and choice.zero_stage > 0
        load_tag = self._universal(local_root, choice.tag) if universal else choice.tag
        return ResumePlan(choice, local_root, load_tag, universal, same_world)

    def older_than(self, ref: CheckpointRef) -> CheckpointRef | None:
        """The newest complete checkpoint before ``ref`` in its folder (not verified here)."""
        try:
            older = [
                r for r in list_checkpoints(ref.root, ref.storage_options) if r.step < ref.step
            ]
        except (OSError, StorageError):
            return None
        return older[-1] if older else None

    def _explicit(self, resume: str) -> CheckpointRef:
        """Rank 0: ``resume=<path>``, verified; a damaged one is an error (and left as it is:
        the user named it)."""
        ref = resolve_checkpoint(resume, self.options)
        fetch_checkpoint(ref, self.local_root)
        return ref

    def _walk_back(self) -> CheckpointRef | None:
        """Rank 0: the newest checkpoint of ``checkpoint.dir`` that verifies. Each newer one is
        quarantined (kept, renamed) and named with its reason in one warning line."""
        skipped: list[tuple[str, str, str]] = []
        choice = None
        for _step, tag, meta in reversed(_scan_tags(self.cfg.dir, self.options)):
            if meta is None:
                reason, detail = "no-manifest", f"no readable {COMPLETE} manifest"
            else:
                ref = CheckpointRef(self.cfg.dir.rstrip("/"), tag, meta, dict(self.options))
                try:
                    fetch_checkpoint(ref, self.local_root)
                except CheckpointDamaged as exc:
                    reason, detail = exc.reason, exc.detail
                else:
                    choice = ref
                    break
            skipped.append((tag, detail, self._quarantine(tag, reason, detail)))
        if choice is not None:
            if skipped:
                self._point_latest(choice.tag)
                log.warning(
                    "resume=auto: skipped %s; resuming from %s",
                    _damage_summary(skipped),
                    choice.tag,
                )
            return choice
        quarantined = list_quarantined(self.cfg.dir, self.options)
        if skipped or any("nonfinite" not in name for name in quarantined):
            what = (
                f"skipped {_damage_summary(skipped)}"
                if skipped
                else (f"it holds only quarantined ones: {', '.join(quarantined[-3:])}")
            )
            raise CheckpointError(
                f"no checkpoint in {self.cfg.dir} verifies ({what}): resume=none starts afresh, "
                "resume=<tag dir> loads one of them anyway"
            )
        return None

    def _universal(self, root: Path, tag: str) -> str:
        """DeepSpeed's universal form of ``tag`` (converted once per filesystem, then reused
        while it verifies)."""
        utag = f"{tag}_universal"
        if self.fs_leader and not _is_valid(root / utag, {}):
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
