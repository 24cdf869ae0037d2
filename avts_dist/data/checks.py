"""The loader's build-time checks: everything that can be known wrong before a worker starts.

``build_loader`` (:mod:`avts_dist.data.loader`) calls these in order, so that a bad dataset or
setting fails at build, in one line, never in a worker: the video decoder loads
(:func:`avts_dist.data.decoders.resolve_video_decoder`), the split has usable clips, its shards
are in storage and one clip reads. :func:`clip_reader` is the one place a :class:`ClipReader`
is made from the data config (the build's probe and the workers' reader).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from avts_dist.config import DataConfig
from avts_dist.data.blocks import BlockSampler, auto_streams
from avts_dist.data.dataset import MEDIA_EXT
from avts_dist.data.health import check_shards
from avts_dist.data.index import DatasetError, DatasetIndex
from avts_dist.data.reader import ClipReader, ReadFailure
from avts_dist.storage import is_remote

__all__ = [
    "block_sampler",
    "cache_bound",
    "check_storage",
    "clip_reader",
    "resolve_access",
    "usable_rows",
]

# The loader's logger: these checks are the loader's build.
log = logging.getLogger("avts.data")


def resolve_access(cfg: DataConfig, url: str, train: bool) -> str:
    """``random`` or ``block``: evaluation always reads clip by clip; ``auto`` is block for
    remote storage and random for local paths (a page cache serves random reads well, and the
    full shuffle is better)."""
    if not train:
        return "random"
    if cfg.access != "auto":
        return cfg.access
    return "block" if is_remote(url) else "random"


def clip_reader(cfg: DataConfig, index: DatasetIndex, concurrency: int) -> ClipReader:
    """The reader of ``cfg``'s dataset with ``concurrency`` reads in flight."""
    return ClipReader(
        index,
        storage_options=cfg.storage_options or None,
        max_retries=cfg.max_retries,
        retry_backoff_s=cfg.retry_backoff_s,
        concurrency=concurrency,
    )


def block_sampler(
    cfg: DataConfig, index: DatasetIndex, pool: np.ndarray, drop_last: bool
) -> BlockSampler:
    j = index.members.index(MEDIA_EXT)
    return BlockSampler(
        pool,
        cfg.global_batch_size,
        cfg.seed,
        shard=index.shard,
        start=index.offset[:, j],
        end=index.offset[:, j] + index.size[:, j],
        block_bytes=int(cfg.block_mb * 2**20),
        window_blocks=cfg.shuffle_window_blocks,
        num_streams=auto_streams(cfg.global_batch_size, cfg.block_streams),
        drop_last=drop_last,
        read_through_bytes=int(cfg.block_read_through_mb * 2**20),
    )


def cache_bound(sampler: BlockSampler, cfg: DataConfig, rank: int, world_size: int) -> int:
    """Bytes the rank's block cache holds at most, in the steady state: per stream, the window
    being read, the next one (prefetched) and the one just finished (evicted once its last
    sample is handed out)."""
    streams = sampler.streams_of(rank, world_size)
    if sampler.num_streams % world_size:
        log.warning(
            "data: %d block streams (data.block_streams) over %d ranks: ranks share streams, "
            "whose blocks each of them reads; use a multiple of the world size",
            sampler.num_streams,
            world_size,
        )
    return len(streams) * 3 * cfg.shuffle_window_blocks * sampler.max_block_bytes


def usable_rows(index: DatasetIndex, rows: np.ndarray, clip_s: float) -> tuple[np.ndarray, dict]:
    """Rows that pretraining can sample, and the count of the others by reason."""
    status = index.status[rows]
    reasons = np.where(status != "ok", status, "")
    reasons = np.where((reasons == "") & ~index.has_video[rows], "no_video", reasons)
    reasons = np.where((reasons == "") & ~index.has_audio[rows], "no_audio", reasons)
    too_short = index.duration[rows].astype(np.float64) + 1e-6 < clip_s
    reasons = np.where((reasons == "") & too_short, "too_short", reasons)
    keep = reasons == ""
    names, counts = np.unique(reasons[~keep], return_counts=True)
    return rows[keep], {str(n): int(c) for n, c in zip(names, counts, strict=True)}


def check_storage(
    cfg: DataConfig, index: DatasetIndex, pool: np.ndarray, split: str, filtered: dict
) -> tuple[np.ndarray, dict[str, Any]]:
    """Fails at build, not in a worker: shards missing from storage (or their clips left out,
    counted in ``filtered``), and one ranged read of a clip (unreadable URL, permissions)."""
    reader = clip_reader(cfg, index, concurrency=1)
    what = f"split {split!r} of {cfg.url!r}"
    try:
        kept, damaged = check_shards(
            index, pool, reader.fs, allow_missing=cfg.allow_missing_shards, what=what
        )
        if damaged:
            filtered["missing_shard"] = int(pool.size - kept.size)
        if kept.size:
            reader.read(int(kept[0]), MEDIA_EXT)
    except (ReadFailure, KeyError) as exc:
        raise DatasetError(f"cannot read clips of {cfg.url!r}: {exc}") from None
    finally:
        reader.close()
    return kept, {**reader.take_stats(), "missing_shards": damaged}
