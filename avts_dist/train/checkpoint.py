"""Complete-or-invisible sharded checkpoints, keep-last-K, local disk or an fsspec URL.

Layout of ``checkpoint.dir``::

    step_000040/              one DeepSpeed tag: mp_rank_*/zero_pp_rank_* shards,
        rng_rank_00000.pt     per-rank RNG states,
        COMPLETE              JSON meta (step, world_size, zero_stage, ...), written last
    step_000040_universal/    DeepSpeed universal form, made on demand for a new world size
    latest                    DeepSpeed's pointer to the newest complete tag

How a save stays invisible until it is whole: every rank writes its shards into the hidden tag
``.tmp-step_000040``; after a barrier, rank 0 renames it to ``step_000040``, writes ``COMPLETE``
and only then rewrites ``latest`` (write + rename, atomic on POSIX). A kill at any point leaves
the previous complete checkpoint as the newest; leftover ``.tmp-*`` directories are removed at the
next save. ``resume=auto`` takes the newest tag with a ``COMPLETE`` file.

Remote destinations (``s3://...``): DeepSpeed writes to local disk, so the checkpoint is written
into the local staging directory ``<run.dir>/checkpoint_staging`` and then uploaded by rank 0
(shards first, ``COMPLETE`` last, then ``latest``). To resume, rank 0 downloads the newest
complete remote checkpoint into the staging directory first. Multi-node runs with a remote
destination need the staging directory on a filesystem shared by the nodes (as DeepSpeed itself
needs for a local checkpoint directory).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avts_dist.config import CheckpointConfig
from avts_dist.storage import get_fs, join

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "CheckpointInfo",
    "CheckpointManager",
    "find_latest_complete",
    "get_rng_state",
    "set_rng_state",
]

CHECKPOINT_FORMAT_VERSION = 1
_TAG_RE = re.compile(r"^step_(\d+)$")
COMPLETE = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


@dataclass
class CheckpointInfo:
    tag: str
    step: int
    path: Path  # local directory holding the tag (staging dir for remote destinations)
    meta: dict[str, Any]


def _is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def _local_path(url: str) -> Path:
    return Path(url[len("file://") :] if url.startswith("file://") else url)


def _list_complete_local(root: Path) -> list[tuple[int, str, dict]]:
    out = []
    if not root.is_dir():
        return out
    for child in root.iterdir():
        m = _TAG_RE.match(child.name)
        marker = child / COMPLETE
        if m and marker.is_file():
            try:
                meta = json.loads(marker.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            out.append((int(m.group(1)), child.name, meta))
    return sorted(out)


def _list_complete_remote(url: str, storage_options: dict | None) -> list[tuple[int, str, dict]]:
    fs, root = get_fs(url, storage_options)
    out = []
    try:
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        return out
    for entry in entries:
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        m = _TAG_RE.match(name)
        if not m:
            continue
        marker = join(root, name, COMPLETE)
        if fs.exists(marker):
            out.append((int(m.group(1)), name, json.loads(fs.cat_file(marker))))
    return sorted(out)


def find_latest_complete(url: str, storage_options: dict | None = None) -> tuple[str, dict] | None:
    """``(tag, meta)`` of the newest complete checkpoint under ``url``, or None."""
    found = (
        _list_complete_remote(url, storage_options)
        if _is_remote(url)
        else _list_complete_local(_local_path(url))
    )
    if not found:
        return None
    _, tag, meta = found[-1]
    return tag, meta


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


class CheckpointManager:
    """Saves and finds checkpoints; every method is called on every rank (collective)."""

    def __init__(
        self,
        cfg: CheckpointConfig,
        *,
        run_dir: str | Path,
        rank: int,
        world_size: int,
        barrier,
    ) -> None:
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self._barrier = barrier
        self.remote = _is_remote(cfg.dir)
        self.local_root = (
            Path(run_dir) / "checkpoint_staging" if self.remote else _local_path(cfg.dir)
        )
        self.last_save_s = 0.0
        self.last_save_bytes = 0

    # ---- save ----

    def save(self, engine, step: int, client_state: dict[str, Any], meta: dict[str, Any]) -> str:
        from avts_dist.distributed.engine import save_engine_checkpoint

        t0 = time.perf_counter()
        tag = tag_for(step)
        tmp_tag = f".tmp-{tag}"
        root = self.local_root
        if self.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        self._barrier()
        save_engine_checkpoint(engine, root, tmp_tag, client_state)
        rng_path = root / tmp_tag / f"rng_rank_{self.rank:05d}.pt"
        torch.save(get_rng_state(), rng_path)
        self._barrier()
        _test_kill_point("after_shards", step)
        if self.rank == 0:
            final = root / tag
            if final.exists():  # the same step saved again (e.g. end right after a periodic save)
                shutil.rmtree(final)
            os.replace(root / tmp_tag, final)
            full_meta = {
                "format_version": CHECKPOINT_FORMAT_VERSION,
                "tag": tag,
                "step": step,
                "world_size": self.world_size,
                "time": time.time(),
                **meta,
            }
            _atomic_write(final / COMPLETE, json.dumps(full_meta, indent=1))
            self.last_save_bytes = sum(f.stat().st_size for f in final.rglob("*") if f.is_file())
            if self.remote:
                self._upload(final, tag)
            _atomic_write(root / "latest", tag)
            self._retain()
        self._barrier()
        self.last_save_s = time.perf_counter() - t0
        return tag

    def _upload(self, local_tag_dir: Path, tag: str) -> None:
        fs, root = get_fs(self.cfg.dir, self.cfg.storage_options or None)
        remote_tag = join(root, tag)
        files = sorted(p for p in local_tag_dir.rglob("*") if p.is_file() and p.name != COMPLETE)
        for f in files:
            rel = f.relative_to(local_tag_dir).as_posix()
            fs.put_file(str(f), join(remote_tag, rel))
        # The marker last: a reader that sees it sees every shard.
        fs.put_file(str(local_tag_dir / COMPLETE), join(remote_tag, COMPLETE))
        fs.pipe_file(join(root, "latest"), tag.encode())

    def _retain(self) -> None:
        keep = self.cfg.keep_last
        if self.remote:
            fs, root = get_fs(self.cfg.dir, self.cfg.storage_options or None)
            found = _list_complete_remote(self.cfg.dir, self.cfg.storage_options or None)
            for _, tag, _ in found[:-keep]:
                fs.rm(join(root, tag), recursive=True)
        found = _list_complete_local(self.local_root)
        for _, tag, _ in found[:-keep]:
            shutil.rmtree(self.local_root / tag, ignore_errors=True)
            shutil.rmtree(self.local_root / f"{tag}_universal", ignore_errors=True)

    # ---- find / fetch ----

    def latest(self) -> tuple[str, dict] | None:
        return find_latest_complete(self.cfg.dir, self.cfg.storage_options or None)

    def fetch(self, tag: str, source: str | None = None) -> Path:
        """The local directory holding ``tag`` (downloaded by rank 0 when remote); collective."""
        source = source or self.cfg.dir
        if not _is_remote(source):
            return _local_path(source)
        local = self.local_root
        if self.rank == 0 and not (local / tag / COMPLETE).is_file():
            fs, root = get_fs(source, self.cfg.storage_options or None)
            tmp = local / f".download-{tag}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            fs.get(join(root, tag) + "/", str(tmp), recursive=True)
            shutil.rmtree(local / tag, ignore_errors=True)
            os.replace(tmp, local / tag)
        self._barrier()
        return local

    def rng_path(self, local_root: Path, tag: str) -> Path:
        return local_root / tag / f"rng_rank_{self.rank:05d}.pt"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _test_kill_point(name: str, step: int) -> None:
    """Test hook: ``AVTS_TEST_KILL_AT=after_shards:<step>`` kills the process (SIGKILL) at that
    point of that step's save, to prove a kill mid-save leaves the previous checkpoint latest."""
    spec = os.environ.get("AVTS_TEST_KILL_AT", "")
    if spec and spec == f"{name}:{step}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
