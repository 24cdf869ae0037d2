"""The checkpoint component: find, validate, fetch, convert and save complete-or-invisible
sharded checkpoints, on local disk or behind an fsspec URL.

Layout of ``checkpoint.dir``::

    step_000040/              one tag: DeepSpeed's shards (their names are engine.py's business),
        rng_rank_00000.pt     per-rank RNG states,
        COMPLETE              JSON: step, world_size, zero_stage, ..., and ``files``, the manifest
                              of every rank's files with their sizes; written last
    step_000040_universal/    DeepSpeed's universal form, made on demand for a new world size
    latest                    the newest complete tag (DeepSpeed's pointer file)

A save stays invisible until it is whole: every rank writes into the hidden tag
``.tmp-step_000040`` and reports the files it wrote with their sizes; rank 0 confirms every one of
them (a stat, or one listing of the remote tag), and only then renames the tag, writes
``COMPLETE`` and rewrites ``latest``. A kill at any point leaves the previous complete checkpoint
the newest; ``.tmp-*`` leftovers are removed at the next save.

Remote destinations (``s3://...``): DeepSpeed writes to a local staging folder
(``checkpoint.staging_dir``, default ``<run.dir>/checkpoint_staging``), then every rank uploads the
files it wrote and rank 0 writes ``COMPLETE`` once all of them are listed remotely. The staging
folder may be node-local: the ranks find out which of them share a filesystem, and to resume, the
first rank of each filesystem fetches the remote tag (so every node has it).

Resume (:meth:`CheckpointManager.plan_resume`) returns a typed :class:`ResumePlan`;
:func:`resolve_checkpoint` turns any path or URL (run dir, checkpoints dir, tag dir, ``s3://``,
``file://``) into a :class:`CheckpointRef`, which export and evaluation use too.
:func:`validate` is the one check before any file of a tag is read.
"""

from __future__ import annotations

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
from avts_dist.distributed.engine import convert_to_universal, save_engine_checkpoint
from avts_dist.storage import StorageError, get_fs, is_remote, join, local_path

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "COMPLETE",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointRef",
    "ResumePlan",
    "fetch_checkpoint",
    "get_rng_state",
    "list_checkpoints",
    "resolve_checkpoint",
    "set_rng_state",
    "tag_for",
    "validate",
]

log = logging.getLogger("avts.train")

CHECKPOINT_FORMAT_VERSION = 1
COMPLETE = "COMPLETE"
LATEST = "latest"
_TAG_RE = re.compile(r"^step_(\d+)$")


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


# ---------------------------------------------------------------------------------------------
# Finding and validating


def _read_meta(fs, marker: str) -> dict[str, Any] | None:
    try:
        meta = json.loads(fs.cat_file(marker))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and "step" in meta else None


def list_checkpoints(url: str, storage_options: dict | None = None) -> list[CheckpointRef]:
    """The complete checkpoints directly under ``url``, oldest first (a missing folder: [])."""
    fs, root = get_fs(url, storage_options)
    try:
        entries = fs.ls(root, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for entry in entries:
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        match = _TAG_RE.match(name)
        if not match:
            continue
        meta = _read_meta(fs, join(root, name, COMPLETE))
        if meta is not None:
            found.append((int(match.group(1)), name, meta))
    return [
        CheckpointRef(url.rstrip("/"), tag, meta, dict(storage_options or {}))
        for _, tag, meta in sorted(found)
    ]


def resolve_checkpoint(url: str, storage_options: dict | None = None) -> CheckpointRef:
    """The checkpoint a path or URL names: a tag dir (with ``COMPLETE``), the newest complete tag
    of a checkpoints dir, or of ``<run dir>/checkpoints``. CheckpointError when there is none."""
    url = url.rstrip("/")
    options = dict(storage_options or {})
    try:
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


def validate(tag_dir: str | Path, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Checks a local tag before any of its files is read; returns its meta.

    Today: the ``COMPLETE`` marker parses, names a known format and its manifest's files are all
    there with their recorded sizes. (Checksums, quarantine and walk-back build on this.)
    """
    tag_dir = Path(tag_dir)
    marker = tag_dir / COMPLETE
    try:
        on_disk = json.loads(marker.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"{tag_dir} is not a complete checkpoint ({COMPLETE}: {exc})"
        ) from None
    meta = meta or on_disk
    if on_disk.get("step") != meta.get("step"):
        raise CheckpointError(f"{tag_dir} holds step {on_disk.get('step')}, not {meta.get('step')}")
    if meta.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{tag_dir}: checkpoint format_version {meta.get('format_version')!r}; this code "
            f"reads {CHECKPOINT_FORMAT_VERSION}"
        )
    problems = []
    for name, size in sorted(meta.get("files", {}).items()):
        path = tag_dir / name
        if not path.is_file():
            problems.append(f"{name} missing")
        elif path.stat().st_size != size:
            problems.append(f"{name} has {path.stat().st_size} bytes, the manifest says {size}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"checkpoint {tag_dir} is damaged: {'; '.join(problems[:3])}{more}")
    return meta


def _is_valid(tag_dir: Path, meta: dict[str, Any]) -> bool:
    try:
        validate(tag_dir, meta)
    except CheckpointError:
        return False
    return True


def fetch_checkpoint(ref: CheckpointRef, local_root: str | Path) -> Path:
    """A local copy of ``ref``: the folder holding ``ref.tag`` (downloaded into ``local_root``
    unless a valid copy is already there). Not collective: call it on one rank per filesystem."""
    if not ref.remote:
        return Path(local_path(ref.root))
    local_root = Path(local_root)
    if _is_valid(local_root / ref.tag, ref.meta):
        return local_root
    tmp = local_root / f".download-{ref.tag}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fs, root = get_fs(ref.root, ref.storage_options or None)
        fs.get(join(root, ref.tag) + "/", str(tmp), recursive=True)
    except (OSError, StorageError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot download checkpoint {ref.url}: {exc}") from None
    validate(tmp, ref.meta)
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


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _filesystem_leader(root: Path, rank: int) -> tuple[bool, int]:
    """Whether this rank is the first of the ranks sharing ``root``'s filesystem, and how many
    filesystems the ranks see. Each rank drops a probe file; a rank sees the probes of the
    ranks on its filesystem (a shared one, or its node's own disk)."""
    root.mkdir(parents=True, exist_ok=True)
    token = C.broadcast_object(uuid.uuid4().hex)
    probe = root / f".probe-{token}-{rank}"
    probe.touch()
    C.barrier()
    seen = [int(p.name.rsplit("-", 1)[1]) for p in root.glob(f".probe-{token}-*")]
    C.barrier()
    probe.unlink()
    leaders = C.all_gather_object(min(seen))
    return min(seen) == rank, len(set(leaders))


class CheckpointManager:
    """Saves checkpoints and plans resumes for one run; every method is collective.

    ``on_event(name, step)`` is called at fixed points of a save (``"after_shards"``: every rank's
    files written, nothing published yet); tests install it to kill a run mid-save.
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
        self.on_event = on_event
        self.remote = is_remote(cfg.dir)
        self.options = dict(cfg.storage_options or {})
        staging = os.path.expandvars(cfg.staging_dir) or str(Path(run_dir) / "checkpoint_staging")
        self.local_root = Path(staging) if self.remote else Path(local_path(cfg.dir))
        self.fs_leader, num_filesystems = _filesystem_leader(self.local_root, rank)
        if num_filesystems > 1 and not self.remote:
            raise CheckpointError(
                f"checkpoint.dir={cfg.dir} is not one filesystem for all ranks (they see "
                f"{num_filesystems}): use a shared filesystem or an s3:// checkpoint.dir"
            )
        self.last_save_s = 0.0
        self.last_save_bytes = 0

    # ---- save ----

    def save(self, engine, step: int, client_state: dict[str, Any], meta: dict[str, Any]) -> str:
        """Writes tag ``step_XXXXXX`` and publishes it once every rank's files are confirmed."""
        t0 = time.perf_counter()
        tag, root = tag_for(step), self.local_root
        tmp_tag = f".tmp-{tag}"
        if self.fs_leader:
            for stale in root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        C.barrier()
        written = save_engine_checkpoint(engine, root, tmp_tag, client_state)
        torch.save(get_rng_state(), root / tmp_tag / rng_file_name(self.rank))
        written.append(rng_file_name(self.rank))
        mine = {name: (root / tmp_tag / name).stat().st_size for name in written}
        if self.remote:
            self._upload(root / tmp_tag, tag, mine)
        files: dict[str, int] = {}
        for part in C.all_gather_object(mine):
            files.update(part)
        if self.on_event is not None:
            self.on_event("after_shards", step)
        full_meta = {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "tag": tag,
            "step": step,
            "world_size": self.world_size,
            "time": time.time(),
            **meta,
            "files": files,
        }
        problem = self._confirm(root / tmp_tag, tag, files) if self.rank == 0 else None
        problem = C.broadcast_object(problem)
        if problem:
            raise CheckpointError(f"checkpoint {tag} not published: {problem}")
        if self.remote and self.rank == 0:
            fs, remote_root = get_fs(self.cfg.dir, self.options or None)
            # The marker last: a reader that sees it sees every file.
            fs.pipe_file(join(remote_root, tag, COMPLETE), json.dumps(full_meta, indent=1).encode())
            fs.pipe_file(join(remote_root, LATEST), tag.encode())
        if self.fs_leader:
            self._publish_local(tmp_tag, tag, full_meta)
        C.barrier()
        self.last_save_bytes = sum(files.values())
        self.last_save_s = time.perf_counter() - t0
        return tag

    def _upload(self, local_tag_dir: Path, tag: str, mine: dict[str, int]) -> None:
        fs, remote_root = get_fs(self.cfg.dir, self.options or None)
        for name in sorted(mine):
            fs.put_file(str(local_tag_dir / name), join(remote_root, tag, name))

    def _confirm(self, local_tag_dir: Path, tag: str, files: dict[str, int]) -> str | None:
        """Rank 0: every rank's file is there with its size (the remote copy when remote)."""
        if self.remote:
            fs, remote_root = get_fs(self.cfg.dir, self.options or None)
            prefix = join(remote_root, tag) + "/"
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
        bad = [f"{n} ({sizes.get(n)} of {s} bytes)" for n, s in files.items() if sizes.get(n) != s]
        return f"files not confirmed: {', '.join(sorted(bad)[:5])}" if bad else None

    def _publish_local(self, tmp_tag: str, tag: str, meta: dict[str, Any]) -> None:
        """This filesystem's copy becomes ``tag`` when it holds every file (a shared filesystem);
        a node-local part of a remote checkpoint is dropped (the remote copy is complete)."""
        root, tmp = self.local_root, self.local_root / tmp_tag
        if all((tmp / name).is_file() for name in meta["files"]):
            final = root / tag
            if final.exists():  # the same step saved again (e.g. end right after a periodic save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _atomic_write(final / COMPLETE, json.dumps(meta, indent=1))
            _atomic_write(root / LATEST, tag)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        self._retain()

    def _retain(self) -> None:
        keep = self.cfg.keep_last
        if self.remote and self.rank == 0:
            fs, remote_root = get_fs(self.cfg.dir, self.options or None)
            for ref in list_checkpoints(self.cfg.dir, self.options)[:-keep]:
                fs.rm(join(remote_root, ref.tag), recursive=True)
        for ref in list_checkpoints(str(self.local_root))[:-keep]:
            shutil.rmtree(self.local_root / ref.tag, ignore_errors=True)
            shutil.rmtree(self.local_root / f"{ref.tag}_universal", ignore_errors=True)

    # ---- resume ----

    def plan_resume(self, resume: str) -> ResumePlan | None:
        """``resume``: ``none``, ``auto`` (the newest complete tag of ``checkpoint.dir``, or a
        fresh start) or any path/URL :func:`resolve_checkpoint` takes. Rank 0 decides; each
        filesystem's first rank fetches; every rank validates its local copy."""
        choice: CheckpointRef | None = None
        error = None
        if self.rank == 0 and resume not in ("", "none"):
            try:
                if resume == "auto":
                    found = list_checkpoints(self.cfg.dir, self.options)
                    choice = found[-1] if found else None
                else:
                    choice = resolve_checkpoint(resume, self.options)
            except (CheckpointError, StorageError, OSError) as exc:
                error = f"resume={resume}: {exc}"
        choice, error = C.broadcast_object((choice, error))
        if error:
            raise CheckpointError(error)
        if choice is None:
            return None
        error = None
        if self.fs_leader:
            try:
                fetch_checkpoint(choice, self.local_root)
            except CheckpointError as exc:
                error = str(exc)
        errors = [e for e in C.all_gather_object(error) if e]
        if errors:
            raise CheckpointError(errors[0])
        local_root = self.local_root if choice.remote else Path(local_path(choice.root))
        validate(local_root / choice.tag, choice.meta)
        same_world = choice.world_size == self.world_size
        universal = not same_world and choice.zero_stage > 0
        load_tag = self._universal(local_root, choice.tag) if universal else choice.tag
        return ResumePlan(choice, local_root, load_tag, universal, same_world)

    def _universal(self, root: Path, tag: str) -> str:
        """DeepSpeed's universal form of ``tag`` (converted once per filesystem, then reused)."""
        utag = f"{tag}_universal"
        if self.fs_leader and not (root / utag / COMPLETE).is_file():
            t0 = time.perf_counter()
            tmp = root / f".tmp-{utag}"
            shutil.rmtree(tmp, ignore_errors=True)
            convert_to_universal(root / tag, tmp)
            meta = json.loads((root / tag / COMPLETE).read_text())
            for rng in (root / tag).glob("rng_rank_*.pt"):
                shutil.copy(rng, tmp / rng.name)
            meta["files"] = {
                p.relative_to(tmp).as_posix(): p.stat().st_size
                for p in tmp.rglob("*")
                if p.is_file()
            }
            _atomic_write(tmp / COMPLETE, json.dumps(meta, indent=1))
            shutil.rmtree(root / utag, ignore_errors=True)
            os.replace(tmp, root / utag)
            log.info(
                "converted %s to DeepSpeed's universal checkpoint in %.1fs (world size change)",
                tag,
                time.perf_counter() - t0,
            )
        C.barrier()
        return utag
