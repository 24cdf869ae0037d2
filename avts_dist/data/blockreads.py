"""Clip bytes for block access: where a sample's clips are, and getting them from the cache.

A sample at global position ``p`` of epoch ``e`` belongs to one window of one stream (see
:mod:`avts_dist.data.blocks`). Its clip, its easy negative and any replacement of a failed clip
are all drawn from that window's clips, so the bytes of a sample come from the few pieces the
rank holds in its cache (:mod:`avts_dist.data.blockcache`) for that window, whatever worker
decodes it. A window whose clips are all of one video draws easy negatives from the whole split
instead, as do replacements after a few failed ones (one ranged read each, counted in
``outside_block_reads``).

Reads: a sample waits only for the pieces of its own clips; the other pieces of its window and
the stream's next window are prefetched in the background (a window is one request per piece,
its clips are used over many steps).
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from avts_dist.data.blockcache import BlockCache, key_of
from avts_dist.data.blocks import BlockSampler, EpochBlocks
from avts_dist.data.reader import ClipReader, ReadFailure

__all__ = ["BlockReads"]

MEDIA_EXT = "mp4"


class BlockReads:
    """Lives in each process that decodes (the main process or a worker); picklable."""

    def __init__(
        self,
        sampler: BlockSampler,
        cache: BlockCache,
        reader: ClipReader,
        video_ids: np.ndarray,
        prefetch_threads: int,
    ) -> None:
        self.sampler = sampler
        self.cache = cache
        self.reader = reader
        self.video_ids = video_ids
        self.prefetch_threads = max(1, int(prefetch_threads))
        self._pid: int | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        # Pieces already queued for prefetch, by epoch (older epochs dropped as we go).
        self._queued: dict[int, set[int]] = {}
        self._mixed_videos: dict[tuple[int, int], bool] = {}
        self.counts = {"block_fallback_reads": 0, "outside_block_reads": 0}
        # The last epoch the loader will read (None: infinite): prefetch stops there.
        self.last_epoch: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_pid=None, _pool=None, _lock=None, _queued={})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _ensure(self) -> None:
        if self._pid != os.getpid():
            self._pool = ThreadPoolExecutor(self.prefetch_threads, thread_name_prefix="avts-pf")
            self._lock = threading.Lock()
            self._queued = {}
            self._pid = os.getpid()

    # ---- where a sample's clips are ----

    def window_of(self, epoch: int, position: int) -> tuple[EpochBlocks, int]:
        eb = self.sampler.blocks(epoch)
        return eb, int(eb.window[self.sampler.slot(position)])

    def candidates(self, epoch: int, position: int, pool: np.ndarray) -> np.ndarray:
        """The clips a sample may draw from (easy negative, replacement): its window's, or
        ``pool`` when the window holds a single video (no easy negative in memory)."""
        eb, window = self.window_of(epoch, position)
        rows = self.sampler.window_rows(eb, window)
        mixed = self._mixed_videos.get((epoch, window))
        if mixed is None:
            ids = self.video_ids[rows]
            mixed = bool((ids != ids[0]).any())
            if len(self._mixed_videos) > 4096:
                self._mixed_videos.clear()
            self._mixed_videos[(epoch, window)] = mixed
        return rows if mixed else pool

    # ---- bytes ----

    def submit(self, epoch: int, position: int, row: int) -> Future:
        """A future of clip ``row``'s bytes, for the sample at ``position``."""
        eb, window = self.window_of(epoch, position)
        try:
            piece = self.sampler.piece_of_row(eb, window, row)
        except KeyError:  # a clip of another window (single-video window, late replacement)
            with self._lock:
                self.counts["outside_block_reads"] += 1
            return self.reader.submit(row, MEDIA_EXT)
        if self.cache.has(key_of(eb.epoch, piece)):
            # Already fetched (the common case): no thread hop for a pread of one clip.
            done: Future = Future()
            try:
                done.set_result(self._clip_bytes(eb, piece, row))
            except ReadFailure as exc:
                done.set_exception(exc)
            return done
        return self.reader.run(self._clip_bytes, eb, piece, row)

    def _read_piece(self, eb: EpochBlocks, piece: int):
        url = self.reader.shard_url(eb.piece_shard[piece])
        start, end = int(eb.piece_start[piece]), int(eb.piece_end[piece])
        return lambda: self.reader.read_range(url, start, end)

    def _clip_bytes(self, eb: EpochBlocks, piece: int, row: int) -> bytes:
        key = key_of(eb.epoch, piece)
        try:
            self.cache.fetch(key, self._read_piece(eb, piece))
            _, offset, size = self.reader.index.member(row, MEDIA_EXT)
            return self.cache.read(key, offset - int(eb.piece_start[piece]), size)
        except (ReadFailure, FileNotFoundError):
            # The piece failed for good (or was evicted under us): this clip alone, retried.
            with self._lock:
                self.counts["block_fallback_reads"] += 1
            return self.reader.read(row, MEDIA_EXT)

    def prefetch(self, tasks: list[tuple]) -> None:
        """Starts fetching the windows of ``tasks`` (``(epoch, position, ...)``) and the next
        window of each of their streams, without waiting."""
        self._ensure()
        windows: set[tuple[int, int]] = set()
        for task in tasks:
            eb, window = self.window_of(task[0], task[1])
            windows.add((eb.epoch, window))
            nxt = self.sampler.next_window(eb, window)
            if nxt is not None:
                windows.add((eb.epoch, nxt))
            elif self.last_epoch is None or eb.epoch < self.last_epoch:
                # The stream's end: its first window of the next epoch (layout precomputed).
                stream = self.sampler.stream_of(task[1])
                following = self.sampler.blocks(eb.epoch + 1)
                first = following.window[stream * self.sampler.stream_len]
                windows.add((eb.epoch + 1, int(first)))
        if not windows:
            return
        oldest = min(epoch for epoch, _ in windows)
        self._queued = {e: q for e, q in self._queued.items() if e >= oldest}
        for epoch, window in sorted(windows):
            eb = self.sampler.blocks(epoch)
            queued = self._queued.setdefault(epoch, set())
            for piece in eb.pieces_of(window):
                if piece in queued:
                    continue
                queued.add(piece)
                assert self._pool is not None
                self._pool.submit(
                    self._prefetch_one, key_of(epoch, piece), self._read_piece(eb, piece)
                )

    def _prefetch_one(self, key: str, read) -> None:
        # A failure is recorded by the cache (.err); the sample that needs it falls back.
        with contextlib.suppress(ReadFailure, OSError):
            self.cache.fetch(key, read, wait=False)

    def take_counts(self) -> dict[str, int]:
        with self._lock:
            out, self.counts = self.counts, dict.fromkeys(self.counts, 0)
        return out

    def close(self, wait: bool = False) -> None:
        """Stops prefetching (queued fetches are dropped; ``wait``: running ones finish)."""
        if self._pool is not None and self._pid == os.getpid():
            self._pool.shutdown(wait=wait, cancel_futures=True)
        self._pool, self._pid = None, None
