"""The checkpoint manager: the collective save protocol (complete or invisible), with keep-last
retention and quarantine after each save, resume planning, and the load of a planned resume.
Every method is collective (called on every rank)."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from avts_dist.config import CheckpointConfig
from avts_dist.distributed import collectives as C
from avts_dist.distributed.engine import (
    estimate_checkpoint_bytes,
    load_engine_checkpoint,
    save_engine_checkpoint,
    snapshot_engine_checkpoint,
)
from avts_dist.integrity import FileRecord, format_bytes, save_torch
from avts_dist.storage import StorageError, atomic_write_text
from avts_dist.train.checkpoint.refs import (
    CHECKPOINT_FORMAT_VERSION,
    COMPLETE,
    LATEST,
    QUARANTINED,
    CheckpointError,
    CheckpointRef,
    manifest_bytes,
    manifest_of,
    rng_file_name,
    tag_for,
)
from avts_dist.train.checkpoint.resume import ResumePlan, older_than, plan_resume
from avts_dist.train.checkpoint.retention import Retention
from avts_dist.train.checkpoint.states import (
    Stateful,
    compose_client_state,
    get_rng_state,
    restore_states,
)
from avts_dist.train.checkpoint.storage import RemoteStorage, storage_for
from avts_dist.train.checkpoint.upload import BackgroundUploader, UploadJob, UploadStats

__all__ = ["CheckpointManager"]

log = logging.getLogger("avts.train")


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


class CheckpointManager:
    """Saves checkpoints and plans resumes for one run; every method is collective.

    The run's resumable parts come as ``states`` (:data:`~.states.STATE_KEYS`: trainer,
    curriculum, loader, rng), each saved under its key in DeepSpeed's client state.

    ``on_event(name, step)`` is called at fixed points of a save: ``"after_space_check"`` (the
    free space was found sufficient, nothing written yet) and ``"after_shards"`` (every rank's
    files written, nothing published yet; with ``checkpoint.async_upload``, every rank's state
    copied) and, in the upload thread, ``"upload_started"``; tests install it to fill the disk
    or kill a run.
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
        self.storage = storage_for(cfg, run_dir)
        self.local_root = self.storage.local_root
        self.fs_leader, num_filesystems, self.num_ranks_here = _filesystem_group(
            self.local_root, rank
        )
        error = None
        if rank == 0:
            try:
                self.storage.check(num_filesystems)
            except CheckpointError as exc:
                error = str(exc)
        error = C.broadcast_object(error)
        if error:
            raise CheckpointError(error)
        self.retention = Retention(self.storage, cfg.keep_last)
        self.last_save_s = 0.0
        self.last_save_bytes = 0
        # The tag `latest` names, once this run knows it (resumed from, or saved).
        self.latest: str | None = None
        # After a resume the first save reads back what it wrote: a new machine, disk or bucket
        # shows a fault at once, not at the next resume.
        self.verify_next_save = False
        self._space_needed = (0, "")
        self.uploader = None
        if cfg.async_upload and isinstance(self.storage, RemoteStorage):
            self.uploader = BackgroundUploader(
                self.storage, rank=rank, world_size=world_size, retries=cfg.upload_retries,
                timeout_s=cfg.upload_timeout_s, publish=self._publish_uploaded,
                on_event=lambda name, step: self.on_event(name, step),
            )  # fmt: skip
        elif cfg.async_upload and rank == 0:
            log.info("checkpoint.async_upload: %s is local, written in place: no upload", cfg.dir)

    # ---- resume ----

    def plan_resume(self, resume: str) -> ResumePlan | None:
        """What ``resume`` (``none``, ``auto`` or a path/URL) resumes from (see
        :func:`~.resume.plan_resume`); None for a fresh start."""
        plan = plan_resume(
            resume, self.retention, rank=self.rank, world_size=self.world_size,
            fs_leader=self.fs_leader,
        )  # fmt: skip
        if plan is not None:
            self.latest = plan.source.tag
            self.verify_next_save = True
            self.last_save_bytes = manifest_bytes(plan.source.meta)
        return plan

    def load(
        self, engine, plan: ResumePlan, states: Mapping[str, Stateful]
    ) -> tuple[dict[str, Any], bool]:
        """Loads the planned checkpoint: model, optimizer and LR schedule into ``engine``, each
        of ``states`` from its key. Returns the client state and whether this rank's random
        generators continue (not at a new world size: the caller reseeds them)."""
        client = load_engine_checkpoint(engine, plan.local_root, plan.load_tag)
        restored = restore_states(
            states, client, world_size=self.world_size, rng_file=plan.rng_file(self.rank)
        )
        return client, restored

    def older_than(self, ref: CheckpointRef) -> CheckpointRef | None:
        return older_than(ref)

    # ---- save ----

    def save(
        self,
        engine,
        step: int,
        states: Mapping[str, Stateful],
        meta: dict[str, Any],
        *,
        extra: Mapping[str, Any] | None = None,
        quarantine: str = "",
    ) -> str:
        """Writes tag ``step_XXXXXX`` (``states`` under their keys, ``extra`` beside them in the
        client state, ``meta`` in ``COMPLETE``) and publishes it (``latest``) once every rank's
        files are confirmed; returns the tag. ``quarantine="nonfinite"``: the state is kept,
        complete, as ``step_XXXXXX.quarantined-nonfinite`` for debugging, never ``latest``.

        With ``checkpoint.async_upload`` (remote), this returns once every rank's state is
        copied to host memory: the staged write, the upload and the publication go on in the
        background (:meth:`finish` waits for them). The previous save's upload is waited for
        first: one in flight at a time."""
        t0 = time.perf_counter()
        if self.uploader is not None and not all(
            C.all_gather_object(self.uploader.wait(self.cfg.upload_timeout_s))
        ):
            raise CheckpointError(
                f"checkpoint {tag_for(step)} not saved: the previous upload is still in flight "
                f"after checkpoint.upload_timeout_s={self.cfg.upload_timeout_s:.0f}s"
            )
        client = compose_client_state(states, world_size=self.world_size, extra=extra or {})
        tag, root = tag_for(step), self.local_root
        tmp = root / f".tmp-{tag}"
        dest = None
        if self.rank == 0:
            dest = (
                self.retention.free_name(f"{tag}.quarantined-{quarantine}") if quarantine else tag
            )
        dest, save_id = C.broadcast_object((dest, f"{tag}-{uuid.uuid4().hex[:12]}"))
        # After the broadcast: every rank's previous upload, if any, has ended.
        if self.fs_leader:
            for stale in root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        self._check_space(tag, engine)
        self.on_event("after_space_check", step)
        snapshots = None
        if self.uploader is not None:
            snapshots = snapshot_engine_checkpoint(engine, root, tmp.name, client)
        if snapshots is not None:
            snapshots[rng_file_name(self.rank)] = get_rng_state()
            self.on_event("after_shards", step)
            meta = self._full_meta(tag, step, meta, {})
            return self._submit_upload(step, tmp, dest, save_id, snapshots, meta, quarantine, t0)
        parts = C.all_gather_object(self._write_part(engine, tmp, dest, client))
        errors = [e for _, e in parts if e]
        if errors:
            self._discard(tmp, dest)
            raise CheckpointError(f"checkpoint {tag} not saved: {errors[0]}; {self._latest_note()}")
        files: dict[str, dict[str, Any]] = {}
        for part, _ in parts:
            files.update(part)
        self.on_event("after_shards", step)
        full_meta = self._full_meta(tag, step, meta, files)
        problem = self._confirm(tmp, dest, files) if self.rank == 0 else None
        problem = C.broadcast_object(problem)
        if problem:
            self._discard(tmp, dest)
            raise CheckpointError(f"checkpoint {tag} not published: {problem}")
        errors = [
            e for e in C.all_gather_object(self._publish(tmp, dest, full_meta, quarantine)) if e
        ]
        if errors:
            self._discard(tmp, dest)
            raise CheckpointError(
                f"checkpoint {tag} not published: {errors[0]}; {self._latest_note()}"
            )
        self.last_save_bytes = manifest_bytes(full_meta)
        self.last_save_s = time.perf_counter() - t0
        if not quarantine:
            self._published(tag)
            self.retention.retain(tag, rank=self.rank, fs_leader=self.fs_leader)
        return dest

    def _full_meta(
        self, tag: str, step: int, meta: dict[str, Any], files: dict[str, Any]
    ) -> dict[str, Any]:
        return {
            "format_version": CHECKPOINT_FORMAT_VERSION, "tag": tag, "step": step,
            "world_size": self.world_size, "time": time.time(), **meta,
            "checksum": "sha256 of each file, taken while it was written", "files": files,
        }  # fmt: skip

    def _published(self, tag: str) -> None:
        self.latest = tag
        self.retention.verified.add(tag)
        self.verify_next_save = False

    # ---- background upload (checkpoint.async_upload) ----

    def _submit_upload(
        self, step: int, tmp: Path, dest: str, save_id: str, snapshots: dict[str, Any],
        meta: dict[str, Any], quarantine: str, t0: float,
    ) -> str:  # fmt: skip
        """Hands this rank's host copies to the background writer and upload; rank 0's job
        publishes. The step was blocked only for the copies."""
        read_back = None
        if self.verify_next_save:
            read_back = lambda records: self._read_back(tmp, dest, records)  # noqa: E731
        note = {"reason": quarantine, "detail": "saved when the run stopped on it"}
        self.uploader.submit(
            UploadJob(
                step, tmp, dest, save_id, snapshots, read_back, meta if self.rank == 0 else {},
                note if quarantine else None,
            )
        )  # fmt: skip
        self.verify_next_save = False
        self.last_save_s = time.perf_counter() - t0
        return dest

    def _publish_uploaded(self, job: UploadJob) -> str | None:
        """Rank 0, in the upload thread, once every rank's upload is verified: the whole
        manifest confirmed on the store, then ``COMPLETE`` and ``latest``, then keep-last."""
        problem = self._confirm(job.tmp_dir, job.dest, job.meta["files"])
        if problem:
            return problem
        self.storage.publish(job.dest, job.meta, job.note)
        if job.note is None:
            self._published(job.dest)
            self.retention.retain(job.dest, rank=0, fs_leader=False)
        return None

    @property
    def upload_stats(self) -> UploadStats:
        return self.uploader.stats if self.uploader is not None else UploadStats()

    def finish(self, timeout_s: float | None = None) -> bool:
        """Collective: waits for this run's upload in flight, at most ``timeout_s``; True when
        no rank has one left. Then the staged copies are dropped (the store holds them)."""
        done = self.uploader is None or self.uploader.wait(timeout_s)
        done = all(C.all_gather_object(done))
        if done and self.uploader is not None and self.fs_leader:
            for staged in self.local_root.glob(".tmp-*"):
                shutil.rmtree(staged, ignore_errors=True)
        return done

    def _publish(self, tmp: Path, dest: str, meta: dict[str, Any], quarantine: str) -> str | None:
        """Writes the marker (and ``latest`` unless quarantined): on the store by rank 0, on each
        filesystem by its first rank. Returns what failed, if anything: a full disk here is the
        same one line as during the write."""
        note = {"reason": quarantine, "detail": "saved when the run stopped on it"}
        if self.rank == 0:
            try:
                self.storage.publish(dest, meta, note if quarantine else None)
            except (OSError, StorageError) as exc:
                return f"cannot write {self.storage.where(tmp, dest)}/{COMPLETE}: {exc}"
        if self.fs_leader:
            try:
                self._publish_local(tmp, dest, meta, note if quarantine else None)
            except OSError as exc:
                if not self.storage.staging_is_cache:
                    return self._write_error(exc, self.local_root / dest)
                log.warning("staged copy of %s not kept: %s", dest, exc)
                shutil.rmtree(tmp, ignore_errors=True)
        return None

    def _publish_local(
        self, tmp: Path, dest: str, meta: dict[str, Any], note: dict[str, str] | None
    ) -> None:
        """This filesystem's copy becomes ``dest`` when it holds every file (a shared
        filesystem), its marker written before the rename so that a ``step_*`` folder is always
        complete; a node-local part of a remote checkpoint is dropped (the remote copy is)."""
        if not all((tmp / name).is_file() for name in meta["files"]):
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if note is not None:
            atomic_write_text(tmp / QUARANTINED, json.dumps(note))
        atomic_write_text(tmp / COMPLETE, json.dumps(meta, indent=1))
        final = self.local_root / dest
        if final.exists():  # the same step saved again (e.g. a resume that went back further)
            shutil.rmtree(final)
        os.replace(tmp, final)
        if note is None:
            atomic_write_text(self.local_root / LATEST, dest)

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
            self.storage.upload(tmp_dir, dest, list(records))
            if self.verify_next_save:
                problem = self._read_back(tmp_dir, dest, records)
                if problem:
                    return {}, problem
        except (OSError, StorageError) as exc:
            return {}, f"cannot write {self.storage.where(tmp_dir, dest)}: {exc}"
        return {name: record.as_json() for name, record in records.items()}, None

    def _read_back(self, tmp_dir: Path, dest: str, records: dict[str, FileRecord]) -> str | None:
        """The files as stored (the remote copy, or the disk past the page cache) against the
        size and sha256 taken while writing them."""
        stored = self.storage.records(tmp_dir, dest, list(records))
        bad = sorted(name for name, record in records.items() if stored[name] != record)
        if bad:
            where = self.storage.where(tmp_dir, dest)
            return f"read back from {where}, {bad[0]} differs from what was written"
        return None

    def _confirm(self, tmp_dir: Path, dest: str, files: dict[str, Any]) -> str | None:
        """Rank 0: every rank's file is stored with its size (the remote copy when remote)."""
        sizes = self.storage.sizes(tmp_dir, dest, list(files))
        expected = {name: entry["size"] for name, entry in manifest_of({"files": files}).items()}
        bad = [
            f"{n} ({sizes.get(n)} of {s} bytes)" for n, s in expected.items() if sizes.get(n) != s
        ]
        return f"files not confirmed: {', '.join(sorted(bad)[:5])}" if bad else None

    def _discard(self, tmp_dir: Path, dest: str) -> None:
        """A save that failed leaves nothing: its temporary folder, and its partial upload."""
        if self.fs_leader:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        if self.rank == 0:
            try:
                self.storage.discard(dest)
            except (OSError, StorageError) as exc:
                log.debug("partial checkpoint %s not removed: %s", dest, exc)
        C.barrier()

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
        latest = self.latest or self.storage.read_latest()
        return f"latest stays {latest}" if latest else "no checkpoint was published before"
