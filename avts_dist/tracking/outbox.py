"""The tracking outbox: every MLflow call of a run, written down before it is sent.

``<run_dir>/tracking/`` holds

- ``outbox.jsonl``: append-only, one strict-JSON record per call, numbered (``seq``) in the
  order the trainer made them::

      {"seq": 12, "op": "metrics", "step": 40, "ts": 1764620000123, "metrics": {"loss": 0.8}}

  ``op`` is one of ``start``, ``params``, ``tags``, ``metrics``, ``text``, ``model``, ``end``
  (see :mod:`avts_dist.tracking.writer` for what each does on the server);
- ``state.json``: what the server has acknowledged, replaced atomically: the run and experiment
  ids, ``acked_seq`` (every record up to it is delivered) and ``key_steps`` (per metric key, the
  highest step the server holds: a metric at or below it is never sent again, which makes the
  replay of a resumed run idempotent).

The file is the buffer of an outage and what ``avts sync-tracking RUN_DIR`` replays later. A
record is appended (and flushed to the OS) by the caller before it returns, so a ``kill -9``
loses nothing that was logged; a record cut short by the kill is dropped on the next open.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Outbox", "OutboxLocked", "OutboxState"]

OUTBOX_FILE = "outbox.jsonl"
STATE_FILE = "state.json"
LOCK_FILE = "outbox.lock"


class OutboxLocked(RuntimeError):
    """Another process (a live trainer, another sync) is delivering this outbox."""


@dataclass
class OutboxState:
    # Names the run on the server (tag avts.tracking_id), so that a lost reply to "create run"
    # finds the run it created instead of creating a second one.
    tracking_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_s: float = field(default_factory=time.time)
    run_id: str = ""
    experiment_id: str = ""
    acked_seq: int = 0
    key_steps: dict[str, int] = field(default_factory=dict)
    # step -> LoggedModel id of the checkpoint saved at that step.
    models: dict[str, str] = field(default_factory=dict)
    num_dropped: int = 0  # records the server refused for good (4xx): warned, never retried

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OutboxState:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class Outbox:
    """The append-only record file and its acknowledgement state (thread-safe appends)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / OUTBOX_FILE
        self.state_path = self.folder / STATE_FILE
        self._lock = threading.Lock()
        self._lock_file = None
        self.state = self._load_state()
        self._drop_partial_tail()
        self.last_seq = self._last_seq()

    # ---- the process lock (flock: released by the kernel when a killed process goes) ----

    def acquire(self) -> None:
        """Holds the outbox for this process; OutboxLocked if another one delivers it."""
        f = open(self.folder / LOCK_FILE, "a+")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise OutboxLocked(
                f"{self.folder} is being delivered by another process (a running trainer or "
                "avts sync-tracking); try again when it has ended"
            ) from None
        self._lock_file = f

    def release(self) -> None:
        if self._lock_file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    # ---- records ----

    def _drop_partial_tail(self) -> None:
        """A record cut short by a kill has no newline: cut it off so the next append starts a
        line of its own."""
        if not self.path.exists():
            return
        with open(self.path, "rb+") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            keep = size
            while keep > 0:
                step = min(65536, keep)
                f.seek(keep - step)
                chunk = f.read(step)
                nl = chunk.rfind(b"\n")
                if nl >= 0:
                    keep = keep - step + nl + 1
                    break
                keep -= step
            f.truncate(keep)

    def _last_seq(self) -> int:
        last = self.state.acked_seq
        for rec in self.read(after_seq=last):
            last = rec["seq"]
        return last

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Numbers the record, writes it as one line and flushes it to the OS; returns it."""
        with self._lock:
            self.last_seq += 1
            record = {"seq": self.last_seq, **record}
            line = json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n"
            with open(self.path, "a") as f:
                f.write(line)
            return record

    def read(self, after_seq: int = 0) -> list[dict[str, Any]]:
        """The records numbered after ``after_seq``, in order."""
        if not self.path.exists():
            return []
        out = []
        with open(self.path) as f:
            for line in f:
                if not line.endswith("\n"):
                    break  # being written by the trainer right now
                rec = json.loads(line)
                if rec["seq"] > after_seq:
                    out.append(rec)
        return out

    # ---- acknowledgement state ----

    def _load_state(self) -> OutboxState:
        if not self.state_path.exists():
            return OutboxState()
        return OutboxState.from_dict(json.loads(self.state_path.read_text()))

    def save_state(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.state), separators=(",", ":")))
        os.replace(tmp, self.state_path)

    @property
    def num_pending(self) -> int:
        return self.last_seq - self.state.acked_seq
