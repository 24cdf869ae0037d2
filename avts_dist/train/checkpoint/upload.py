"""Uploads off the critical path (``checkpoint.async_upload``): the step only copies this rank's
state to host memory (DeepSpeed's save, through a checkpoint engine that keeps copies); one
background thread per rank then writes the staged files (size and sha256 taken on the way),
uploads them, verifies them on the store and leaves a marker there with their records; rank 0's
thread waits for every rank's marker, builds the manifest from them and publishes.

The thread never touches a process group: it speaks to the object store only (fsspec), and the
ranks learn of each other's uploads through markers on the store (``storage.put_marker``), not
through a collective. This module imports nothing of ``avts_dist.distributed`` on purpose (a
test checks it). At most one upload is in flight: :meth:`BackgroundUploader.wait` is called
before the next save, and its wait is counted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avts_dist.integrity import FileRecord, save_torch
from avts_dist.train.checkpoint.storage import RemoteStorage

__all__ = ["BackgroundUploader", "UploadJob", "UploadStats"]

log = logging.getLogger("avts.train")

_MAX_RETRY_WAIT_S = 30.0
_POLL_S = 0.2


@dataclass
class UploadJob:
    """One rank's part of one save: ``snapshots`` (file name -> host copy of its state) to be
    written into ``tmp_dir`` and uploaded under ``dest``; ``save_id`` names the save's markers.
    ``read_back(records)``: the stored files' hashes compared (after a resume). Rank 0's job
    carries the ``meta`` to publish (its manifest filled from the markers) and the quarantine
    ``note``, if any."""

    step: int
    tmp_dir: Path
    dest: str
    save_id: str
    snapshots: dict[str, Any]
    read_back: Callable[[dict[str, FileRecord]], str | None] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    note: dict[str, str] | None = None


@dataclass
class UploadStats:
    """What the run's uploads cost the step and met on the way (metrics ``checkpoint/*``)."""

    num_waits: int = 0  # saves that found the previous upload still in flight
    wait_s: float = 0.0  # the step's total wait for them
    num_retries: int = 0  # failed upload attempts, retried
    num_failed: int = 0  # saves whose upload or publish failed for good
    last_error: str = ""

    def as_metrics(self) -> dict[str, float]:
        return {
            "checkpoint/num_upload_waits": self.num_waits,
            "checkpoint/upload_wait_s": self.wait_s,
            "checkpoint/num_upload_retries": self.num_retries,
            "checkpoint/num_upload_failed": self.num_failed,
        }


class BackgroundUploader:
    """This rank's background uploads to ``storage``, one at a time. ``publish(job)`` is rank
    0's last stage (called in the thread once every rank's marker is in): it returns what
    failed, if anything. ``on_event(name, step)``: ``"upload_started"`` after this rank's first
    file is stored (tests kill the run there)."""

    def __init__(
        self,
        storage: RemoteStorage,
        *,
        rank: int,
        world_size: int,
        retries: int,
        timeout_s: float,
        publish: Callable[[UploadJob], str | None],
        on_event: Callable[[str, int], None],
    ) -> None:
        self.storage, self.rank, self.world_size = storage, rank, world_size
        self.retries, self.timeout_s = retries, timeout_s
        self.publish, self.on_event = publish, on_event
        self.stats = UploadStats()
        self._thread: threading.Thread | None = None

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: UploadJob) -> None:
        if self.in_flight:
            raise RuntimeError("an upload is in flight: wait() for it first")
        self._thread = threading.Thread(
            target=self._run, args=(job,), name=f"avts-upload-{job.dest}", daemon=True
        )
        self._thread.start()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Waits for the upload in flight (at most ``timeout_s``); True when none is left. A
        wait that was needed is logged and counted."""
        if not self.in_flight:
            return True
        t0 = time.perf_counter()
        self._thread.join(timeout_s)
        waited = time.perf_counter() - t0
        self.stats.num_waits += 1
        self.stats.wait_s += waited
        done = not self._thread.is_alive()
        log.info(
            "checkpoint: waited %.2fs for the previous upload (%s)%s", waited,
            self._thread.name.removeprefix("avts-upload-"), "" if done else ", still in flight",
        )  # fmt: skip
        return done

    # ---- the thread ----

    def _run(self, job: UploadJob) -> None:
        try:
            try:
                records = self._write(job)
            except OSError as exc:
                records, problem = {}, f"cannot write {job.tmp_dir}: {exc}"
            else:
                problem = self._upload(job, records)
            self._mark(job, problem, records)
            if problem is None and self.rank == 0:
                problem = self._await_ranks(job) or self.publish(job)
                if problem is None:
                    self._drop_markers(job)
        except Exception as exc:  # the thread reports, never raises into nothing
            problem = _text(exc)
        if problem is not None:
            self.stats.num_failed += 1
            self.stats.last_error = f"checkpoint {job.dest} not published: {problem}"
            log.warning("%s; training goes on", self.stats.last_error)

    def _write(self, job: UploadJob) -> dict[str, FileRecord]:
        """The staged files, each with the size and sha256 of the bytes written; the host
        copies are let go once on disk."""
        records = {}
        for name in sorted(job.snapshots):
            path = job.tmp_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            records[name] = save_torch(job.snapshots.pop(name), path)
        return records

    def _upload(self, job: UploadJob, records: dict[str, FileRecord]) -> str | None:
        """This rank's files on the store, sizes (and, when asked, hashes) checked; retried."""
        names = sorted(records)

        def put_and_check() -> None:
            self._put(job, names)
            stored = self.storage.sizes(job.tmp_dir, job.dest, names)
            bad = [n for n in names if stored.get(n) != records[n].size]
            problem = f"{bad[0]} stored with {stored.get(bad[0])} bytes" if bad else None
            if problem is None and job.read_back is not None:
                problem = job.read_back(records)
            if problem is not None:
                raise _NotStored(problem)

        where = self.storage.where(job.tmp_dir, job.dest)
        try:
            self._retrying(put_and_check, job, f"upload to {where}")
        except Exception as exc:  # s3fs/botocore raise many kinds
            return f"upload failed {self.retries + 1} times, last: {_text(exc)}"
        return None

    def _put(self, job: UploadJob, names: list[str]) -> None:
        first, rest = names[:1], names[1:]
        self.storage.upload(job.tmp_dir, job.dest, first)
        self.on_event("upload_started", job.step)
        self.storage.upload(job.tmp_dir, job.dest, rest)

    def _mark(self, job: UploadJob, problem: str | None, records: dict[str, FileRecord]) -> None:
        note = {"files": {n: r.as_json() for n, r in records.items()}}
        note = note if problem is None else {"error": problem}
        self._retrying(lambda: self.storage.put_marker(job.save_id, self.rank, note), job)

    def _await_ranks(self, job: UploadJob) -> str | None:
        """Rank 0: every rank's marker, polled on the store (no collective); their records make
        the manifest of ``job.meta``."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            markers = self._retrying(lambda: self.storage.read_markers(job.save_id), job)
            errors = [f"rank {r}: {m['error']}" for r, m in sorted(markers.items()) if "error" in m]
            if errors:
                return errors[0]
            if len(markers) >= self.world_size:
                for marker in markers.values():
                    job.meta["files"].update(marker["files"])
                return None
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.world_size)) - set(markers))
                return f"ranks {missing} did not finish their upload in {self.timeout_s:.0f}s"
            time.sleep(_POLL_S)

    def _drop_markers(self, job: UploadJob) -> None:
        try:
            self.storage.drop_markers(job.save_id)
        except Exception as exc:
            log.debug("upload markers of %s not removed: %s", job.dest, exc)

    def _retrying(self, call: Callable[[], Any], job: UploadJob, what: str = "store call") -> Any:
        """``call()``, retried ``checkpoint.upload_retries`` times (waits 1, 2, 4 ... s): an
        outage of the store is logged on each failure and counted, and training goes on."""
        for attempt in range(self.retries + 1):
            try:
                return call()
            except Exception as exc:
                if attempt == self.retries:
                    raise
                self.stats.num_retries += 1
                pause = min(2.0**attempt, _MAX_RETRY_WAIT_S)
                log.warning(
                    "checkpoint %s: %s failed (attempt %d of %d): %s; retrying in %.0fs",
                    job.dest, what, attempt + 1, self.retries + 1, _text(exc), pause,
                )  # fmt: skip
                time.sleep(pause)
        return None


class _NotStored(Exception):
    """An upload that went through but does not match what was written."""


def _text(exc: Exception) -> str:
    return str(exc) if isinstance(exc, _NotStored) else f"{type(exc).__name__}: {exc}"
