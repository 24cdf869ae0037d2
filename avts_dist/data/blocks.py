"""The block order: a deterministic two-level shuffle over contiguous runs of shards.

Block access (``data.access=block``, see ``docs/data-loading.md``) reads a shard in *blocks*:
runs of consecutive clips of one shard of at most ``data.block_mb``, fetched in one request and
served from memory. The global order of an epoch is a pure function of ``(seed, epoch)``:

1. the blocks of the split are permuted from ``(seed, epoch)``;
2. the permuted sequence of clips is cut into ``C`` equal *streams* (``data.block_streams``),
   stream ``l`` holding the clips ``[l*L, (l+1)*L)``; a block cut by a stream boundary becomes two
   *pieces* (each an exact byte range, so no byte is fetched twice);
3. inside each stream, consecutive pieces are grouped into *windows* of
   ``data.shuffle_window_blocks`` pieces, and the clips of a window are shuffled;
4. global step ``j`` holds ``q = B / C`` consecutive clips of every stream: global position
   ``j*B + l*q + i`` is clip ``j*q + i`` of stream ``l``.

Rank ``r`` of ``w`` takes positions ``[r*B/w, (r+1)*B/w)`` of every step as before, i.e. whole
streams when ``w`` divides ``C``: it needs only its streams' blocks, at any world size and any
worker count, and the order never depends on either. The state stays the global step.

Everything here is numpy on index columns (no I/O), so it is cheap to test and to benchmark at
AudioSet scale.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from avts_dist.data.sampler import GlobalSampler

__all__ = ["BlockSampler", "EpochBlocks", "auto_streams", "cut_blocks"]

# A gap between two wanted members (other splits, filtered clips) is read through when reading
# it costs less than a new request: gap < first-byte latency x stream bandwidth, 2 MB at S3's
# 20 ms and 100 MB/s (the low end of 20-50 ms: read-through never costs more than the request it
# saves). data.block_read_through_mb sets it (docs/data-loading.md).
DEFAULT_READ_THROUGH_BYTES = 2 * 2**20
# The gap before data.block_read_through_mb existed: runs with it keep their order fingerprint.
LEGACY_READ_THROUGH_BYTES = 64 * 1024
# The largest stream count "auto" picks (data.block_streams=0): the order is fixed for a run,
# so it must not depend on the world size; 256 keeps one stream per rank up to 256 ranks and
# the per-rank cache at 32 streams on 8 GPUs.
MAX_AUTO_STREAMS = 256
_BLOCK_STREAM = 0xB10C
_WINDOW_STREAM = 0x3A1D


def auto_streams(global_batch_size: int, requested: int = 0) -> int:
    """``requested`` if set, else the largest divisor of the global batch <= MAX_AUTO_STREAMS."""
    if requested:
        return int(requested)
    return max(
        d
        for d in range(1, min(global_batch_size, MAX_AUTO_STREAMS) + 1)
        if global_batch_size % d == 0
    )


def cut_blocks(
    shard: np.ndarray,
    start: np.ndarray,
    end: np.ndarray,
    block_bytes: int,
    max_gap: int = DEFAULT_READ_THROUGH_BYTES,
) -> np.ndarray:
    """Start indices of blocks over clips sorted by (shard, start), plus ``len`` at the end.

    A block is a run of one shard spanning at most ``block_bytes`` (at least one clip) with no
    gap above ``max_gap`` between consecutive clips.
    """
    n = len(shard)
    starts = [0]
    first = int(start[0]) if n else 0
    for i in range(1, n):
        if (
            shard[i] != shard[i - 1]
            or start[i] - end[i - 1] > max_gap
            or end[i] - first > block_bytes
        ):
            starts.append(i)
            first = int(start[i])
    starts.append(n)
    return np.asarray(starts, dtype=np.int64)


@dataclass(frozen=True)
class EpochBlocks:
    """One epoch of the block order, in stream coordinates.

    ``clip[s]`` is the dataset-order index (into :attr:`BlockSampler.rows`) of stream slot ``s``
    (``s = l*L + t``: clip ``t`` of stream ``l``); ``piece[s]`` and ``window[s]`` its piece and
    window. Pieces are byte ranges ``[piece_start, piece_end)`` of shard ``piece_shard``; window
    ``w`` is the slots ``[window_lo[w], window_hi[w])`` and pieces
    ``[window_first_piece[w], window_first_piece[w + 1])``.
    """

    epoch: int
    clip: np.ndarray
    piece: np.ndarray
    window: np.ndarray
    piece_shard: np.ndarray
    piece_start: np.ndarray
    piece_end: np.ndarray
    window_lo: np.ndarray
    window_hi: np.ndarray
    window_first_piece: np.ndarray
    window_last_step: np.ndarray

    @property
    def num_windows(self) -> int:
        return len(self.window_lo)

    @cached_property
    def piece_last_step(self) -> np.ndarray:
        """The last step (within the epoch) that may read each piece: its window's last."""
        return np.repeat(self.window_last_step, np.diff(self.window_first_piece))

    def pieces_of(self, window: int) -> range:
        return range(int(self.window_first_piece[window]), int(self.window_first_piece[window + 1]))


class BlockSampler(GlobalSampler):
    """:class:`GlobalSampler` whose epoch order is the block order (module docstring).

    ``shard``, ``start`` and ``end`` give, for every row of the index, its shard id and the byte
    range of its media member; only the rows of ``pool`` are used.
    """

    def __init__(
        self,
        pool: np.ndarray,
        global_batch_size: int,
        seed: int,
        *,
        shard: np.ndarray,
        start: np.ndarray,
        end: np.ndarray,
        block_bytes: int,
        window_blocks: int,
        num_streams: int,
        drop_last: bool = True,
        read_through_bytes: int = DEFAULT_READ_THROUGH_BYTES,
    ) -> None:
        pool = np.asarray(pool, dtype=np.int64)
        # Dataset order: by shard, then byte offset, so that a block is one byte range.
        pool = pool[np.lexsort((start[pool], shard[pool]))]
        super().__init__(pool, global_batch_size, seed, shuffle=True, drop_last=drop_last)
        if global_batch_size % num_streams:
            raise ValueError(f"{num_streams} streams do not divide the batch {global_batch_size}")
        self.rows = self.pool
        self.shard = np.asarray(shard[pool], dtype=np.int64)
        self.start = np.asarray(start[pool], dtype=np.int64)
        self.end = np.asarray(end[pool], dtype=np.int64)
        self.block_bytes = int(block_bytes)
        self.window_blocks = int(window_blocks)
        self.num_streams = int(num_streams)
        self.per_stream_step = global_batch_size // num_streams  # q
        self.read_through_bytes = int(read_through_bytes)
        self.block_starts = cut_blocks(
            self.shard, self.start, self.end, self.block_bytes, self.read_through_bytes
        )
        self.num_positions = self.steps_per_epoch * global_batch_size
        self.stream_len = self.num_positions // self.num_streams  # L
        self._epochs: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_epochs={}, _lock=None, _pool=None, _pid=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def num_blocks(self) -> int:
        return len(self.block_starts) - 1

    @cached_property
    def max_block_bytes(self) -> int:
        lo, hi = self.block_starts[:-1], self.block_starts[1:] - 1
        return int((self.end[hi] - self.start[lo]).max())

    def order_fingerprint(self) -> str:
        """What fixes the order beyond seed and batch: a resumed run must use the same."""
        gap = self.read_through_bytes
        return (
            f"block:bytes={self.block_bytes}:window={self.window_blocks}:streams={self.num_streams}"
        ) + (f":gap={gap}" if gap != LEGACY_READ_THROUGH_BYTES else "")

    # ---- the epoch layout ----

    def blocks(self, epoch: int) -> EpochBlocks:
        """The layout of ``epoch``. The next epoch's is computed in the background meanwhile
        (about a second at AudioSet scale: no stall at an epoch's end); two are kept."""
        with self._lock:
            if self._pid != os.getpid():
                # After a fork the pool's thread is gone: keep finished layouts only.
                self._epochs = {e: f for e, f in self._epochs.items() if f.done()}
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="avts-blocks")
                self._pid = os.getpid()
            for e in (epoch, epoch + 1):
                if e not in self._epochs:
                    self._epochs[e] = self._pool.submit(self._layout, e)
            found = self._epochs[epoch]
            self._epochs = {e: f for e, f in self._epochs.items() if e >= epoch - 1}
        return found.result()

    def _layout(self, epoch: int) -> EpochBlocks:
        n, nb = len(self.rows), self.num_blocks
        rng = np.random.Generator(
            np.random.Philox(np.random.SeedSequence([self.seed, _BLOCK_STREAM, int(epoch)]))
        )
        perm = rng.permutation(nb)
        lens = np.diff(self.block_starts)[perm]
        first = self.block_starts[:-1][perm]
        # Clip indices of the permuted blocks, concatenated (vectorised np.concatenate).
        seq = np.repeat(first - (np.cumsum(lens) - lens), lens) + np.arange(n)
        # Past the end (no drop_last): wrap to the start of the same epoch's sequence.
        seq = seq[np.arange(self.num_positions) % n]
        block_id = np.repeat(np.arange(nb), np.diff(self.block_starts))[seq]
        slots = np.arange(self.num_positions)
        stream = slots // self.stream_len
        cut = np.ones(self.num_positions, dtype=bool)
        cut[1:] = (block_id[1:] != block_id[:-1]) | (stream[1:] != stream[:-1])
        piece = np.cumsum(cut) - 1
        piece_lo = np.flatnonzero(cut)
        piece_start = np.minimum.reduceat(self.start[seq], piece_lo)
        piece_end = np.maximum.reduceat(self.end[seq], piece_lo)
        piece_shard = self.shard[seq[piece_lo]]
        # Windows: consecutive pieces of one stream.
        stream_first_piece = piece[np.arange(self.num_streams) * self.stream_len]
        win_in_stream = (piece - stream_first_piece[stream]) // self.window_blocks
        wcut = np.ones(self.num_positions, dtype=bool)
        wcut[1:] = (win_in_stream[1:] != win_in_stream[:-1]) | (stream[1:] != stream[:-1])
        window = np.cumsum(wcut) - 1
        window_lo = np.flatnonzero(wcut)
        window_hi = np.append(window_lo[1:], self.num_positions)
        window_first_piece = np.append(piece[window_lo], len(piece_lo))
        window_last_step = ((window_hi - 1) % self.stream_len) // self.per_stream_step
        # Shuffle inside windows: sort by (window, random 32-bit draw), stable so that equal
        # draws keep their order on every platform.
        wrng = np.random.Generator(
            np.random.Philox(np.random.SeedSequence([self.seed, _WINDOW_STREAM, int(epoch)]))
        )
        draw = wrng.integers(0, 2**32, self.num_positions, dtype=np.int64)
        inside = np.argsort((window << 32) | draw, kind="stable")
        small = np.int32 if self.num_positions < 2**31 else np.int64
        return EpochBlocks(
            epoch=int(epoch),
            clip=seq[inside].astype(small),
            piece=piece[inside].astype(small),
            window=window.astype(small),
            piece_shard=piece_shard,
            piece_start=piece_start,
            piece_end=piece_end,
            window_lo=window_lo,
            window_hi=window_hi,
            window_first_piece=window_first_piece,
            window_last_step=window_last_step,
        )

    # ---- positions ----

    def slot(self, position: int) -> int:
        """Stream slot of global position ``position`` (within its epoch)."""
        b, q = self.global_batch_size, self.per_stream_step
        position %= self.num_positions
        step, within = divmod(position, b)
        stream, i = divmod(within, q)
        return stream * self.stream_len + step * q + i

    def stream_of(self, position: int) -> int:
        return (position % self.global_batch_size) // self.per_stream_step

    def row_at(self, epoch: int, position: int) -> int:
        return int(self.rows[self.blocks(epoch).clip[self.slot(position)]])

    def order(self, epoch: int) -> np.ndarray:
        eb = self.blocks(epoch)
        slots = eb.clip.reshape(self.num_streams, self.steps_per_epoch, self.per_stream_step)
        return self.rows[slots.transpose(1, 0, 2).reshape(-1)]

    def window_rows(self, eb: EpochBlocks, window: int) -> np.ndarray:
        """Rows of a window: the clips in memory with a sample of it (easy negatives,
        replacements)."""
        return self.rows[eb.clip[eb.window_lo[window] : eb.window_hi[window]]]

    def piece_of_row(self, eb: EpochBlocks, window: int, row: int) -> int:
        lo, hi = int(eb.window_lo[window]), int(eb.window_hi[window])
        hit = np.flatnonzero(self.rows[eb.clip[lo:hi]] == row)
        if hit.size == 0:
            raise KeyError(f"row {row} is not in window {window} of epoch {eb.epoch}")
        return int(eb.piece[lo + hit[0]])

    def next_window(self, eb: EpochBlocks, window: int) -> int | None:
        """The stream's next window in this epoch, or None at the stream's end."""
        nxt = window + 1
        if nxt >= eb.num_windows:
            return None
        same = eb.window_lo[nxt] // self.stream_len == eb.window_lo[window] // self.stream_len
        return nxt if same else None

    def streams_of(self, rank: int, world_size: int) -> range:
        """Streams holding rank ``rank``'s positions."""
        local = self.global_batch_size // world_size
        lo, hi = rank * local, (rank + 1) * local
        return range(lo // self.per_stream_step, math.ceil(hi / self.per_stream_step))
