"""The worker side of the loader: a batch's sample tasks in, one collated batch out.

:class:`PairDataset` runs in each loader worker (or in the main process with
``num_workers=0``). For a batch's tasks ``(epoch, position, row, mix)`` it plans every sample
from the index alone, issues all reads first (the reader's pool bounds them), then decodes in
order while later reads are still in flight; a clip that fails is replaced deterministically
and counted. The main process (:mod:`avts_dist.data.loader`) decides which tasks, and keeps the
state and the telemetry.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch

from avts_dist.config import DataConfig
from avts_dist.data.blockcache import BlockCache
from avts_dist.data.blockreads import BlockReads
from avts_dist.data.blocks import BlockSampler
from avts_dist.data.decode import DecodeError, audio_window, decode_audio, decode_video, logmel
from avts_dist.data.index import DatasetIndex
from avts_dist.data.pairs import NEGATIVE_KINDS, PairPlan, ViewsPlan, plan_pair, plan_views
from avts_dist.data.reader import ClipReader, ReadFailure
from avts_dist.data.sampler import sample_rng

__all__ = ["MEDIA_EXT", "PairDataset", "Tasks", "mix_dict", "mix_tuple"]

MEDIA_EXT = "mp4"
# A sample whose clip (or negative) keeps failing is replaced at most this many times.
MAX_ATTEMPTS = 32
# Block access draws replacements from the sample's window (in memory) this many times, then
# from the whole split: a window can be small, or all bad (a corrupt shard).
WINDOW_ATTEMPTS = 4


def mix_tuple(mix: dict[str, float]) -> tuple[float, ...]:
    """A negative mix as a hashable task field, in :data:`NEGATIVE_KINDS` order."""
    return tuple(float(mix.get(k, 0.0)) for k in NEGATIVE_KINDS)


def mix_dict(mix: tuple[float, ...]) -> dict[str, float]:
    return {k: v for k, v in zip(NEGATIVE_KINDS, mix, strict=True) if v > 0}


class Tasks(list):
    """One batch's tasks, plus ``ahead``: the tasks of the same worker's next batch, whose reads
    start behind this batch's."""

    def __init__(self, tasks=(), ahead=()) -> None:
        super().__init__(tasks)
        self.ahead = list(ahead)


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack``; in a worker, straight into shared memory (as torch's default_collate
    does), which saves the copy the result queue would otherwise make."""
    out = None
    if torch.utils.data.get_worker_info() is not None:
        elem = tensors[0]
        storage = elem._typed_storage()._new_shared(len(tensors) * elem.numel(), device=elem.device)
        out = elem.new(storage).resize_(len(tensors), *elem.shape)
    return torch.stack(tensors, 0, out=out)


class _AllAttemptsFailed(Exception):
    pass


class _NegativeFailed(Exception):
    """The negative's clip failed to decode: its key is the one to report."""

    def __init__(self, cause: DecodeError) -> None:
        super().__init__(str(cause))
        self.cause = cause


class PairDataset(torch.utils.data.Dataset):
    """Turns a list of sample tasks ``(epoch, position, row, mix)`` into one collated batch
    (AVTS pairs, or with ``views`` two video windows of each clip).

    All reads of the batch are issued first (bounded by the reader's pool), then the clips are
    decoded in order while later reads are still in flight. With block access (``blocks``) the
    reads come from the rank's block cache and candidates are the sample's window.
    ``video_decoder`` is the resolved decoder (never ``auto``: the build chose it).
    """

    def __init__(
        self,
        cfg: DataConfig,
        index: DatasetIndex,
        pool: np.ndarray,
        video_ids: np.ndarray,
        train: bool,
        reader: ClipReader,
        video_decoder: str,
        blocks: tuple[BlockSampler, BlockCache] | None = None,
        views: bool = False,
    ) -> None:
        self.cfg = cfg
        self.views = views
        self.index = index
        self.pool = pool
        self.durations = index.duration.astype(np.float64)
        self.video_ids = video_ids
        self.train = train
        self.clip_s = cfg.num_frames / cfg.fps
        self.num_audio = int(round(self.clip_s * cfg.sample_rate))
        self.reader = reader
        self.video_decoder = video_decoder
        self.blocks = None
        if blocks is not None:
            sampler, cache = blocks
            self.blocks = BlockReads(
                sampler, cache, self.reader, video_ids, max(2, cfg.prefetch // 2)
            )
        self.decodes = Counter()
        # task -> (plan, read futures) started ahead of the batch that needs them.
        self._ahead: dict[tuple, tuple[PairPlan | ViewsPlan, tuple[Future, Future | None]]] = {}

    def __len__(self) -> int:
        return len(self.pool)

    def _plan(
        self, epoch: int, position: int, row: int, mix: dict, attempt: int
    ) -> PairPlan | ViewsPlan:
        rng = sample_rng(self.cfg.seed, epoch, position, attempt)
        pool = self.pool
        if self.blocks is not None and attempt <= WINDOW_ATTEMPTS:
            # Easy negatives and replacements come from the clips of the sample's window.
            pool = self.blocks.candidates(epoch, position, pool)
        if attempt > 0:
            # A replacement clip: drawn from the pool by the same counter-based generator.
            row = int(pool[int(rng.integers(0, len(pool)))])
        if self.views:
            return plan_views(rng, row, self.durations, self.clip_s)
        return plan_pair(
            rng,
            row,
            pool,
            self.durations,
            self.video_ids,
            self.clip_s,
            self.cfg.min_shift,
            mix,
            self.train,
        )

    def _start(self, task: tuple) -> tuple[PairPlan | ViewsPlan, tuple[Future, Future | None]]:
        epoch, pos, row, mix = task
        plan = self._plan(epoch, pos, row, mix_dict(mix), 0)
        return plan, self._fetch(plan, epoch, pos)

    def _fetch(
        self, plan: PairPlan | ViewsPlan, epoch: int, position: int
    ) -> tuple[Future, Future | None]:
        if self.blocks is not None:
            submit = lambda row: self.blocks.submit(epoch, position, row)  # noqa: E731
        else:
            submit = lambda row: self.reader.submit(row, MEDIA_EXT)  # noqa: E731
        pos = submit(plan.row)
        neg_row = getattr(plan, "neg_row", plan.row)  # two views read one clip
        neg = submit(neg_row) if neg_row != plan.row else None
        return pos, neg

    def _audio(self, wave: np.ndarray, start_s: float) -> torch.Tensor:
        cfg = self.cfg
        window = audio_window(wave, cfg.sample_rate, start_s, self.clip_s)
        return logmel(window, cfg.sample_rate, cfg.num_mel_bins, cfg.mel_win_ms, cfg.mel_hop_ms)

    def _decode_views(self, plan: ViewsPlan, clip_bytes: bytes) -> dict:
        """Two windows of one clip, each with its own crop/flip draw; no audio."""
        cfg, views = self.cfg, {}
        for name, start, seed in (
            ("video", plan.video_start, plan.aug_seed),
            ("video2", plan.video2_start, plan.aug2_seed),
        ):
            aug = np.random.Generator(np.random.Philox(seed))
            self.decodes["video_decodes"] += 1
            views[name] = decode_video(
                clip_bytes, start, cfg.num_frames, cfg.fps, cfg.size, self.train, aug,
                uint8=True, decoder=self.video_decoder,
            )  # fmt: skip
        return views

    def _decode(
        self, plan: PairPlan | ViewsPlan, pos_bytes: bytes, neg_bytes: bytes | None
    ) -> dict:
        if isinstance(plan, ViewsPlan):
            return self._decode_views(plan, pos_bytes)
        cfg = self.cfg
        aug = np.random.Generator(np.random.Philox(plan.aug_seed))
        self.decodes["video_decodes"] += 1
        video = decode_video(
            pos_bytes, plan.video_start, cfg.num_frames, cfg.fps, cfg.size, self.train, aug,
            uint8=True, decoder=self.video_decoder,
        )  # fmt: skip
        # Only the audio spans needed are decoded: one span covering the positive and a
        # same-clip negative, or the positive's and the other clip's windows.
        lo, hi = plan.video_start, plan.video_start + self.clip_s
        if neg_bytes is None:
            lo, hi = min(lo, plan.neg_start), max(hi, plan.neg_start + self.clip_s)
        self.decodes["audio_decodes"] += 1
        wave = decode_audio(pos_bytes, cfg.sample_rate, lo, hi)
        audio = self._audio(wave, plan.video_start - lo)
        try:
            if neg_bytes is None:
                neg_audio = self._audio(wave, plan.neg_start - lo)
            else:
                self.decodes["audio_decodes"] += 1
                neg_wave = decode_audio(
                    neg_bytes, cfg.sample_rate, plan.neg_start, plan.neg_start + self.clip_s
                )
                neg_audio = self._audio(neg_wave, 0.0)
        except DecodeError as exc:
            raise _NegativeFailed(exc) from None
        return {"video": video, "audio": audio, "neg_audio": neg_audio}

    def __getitem__(self, task):  # pragma: no cover - the loader always asks for batches
        return self.__getitems__([task])

    def __getitems__(self, tasks: list[tuple]) -> dict[str, Any]:
        t_start = time.perf_counter()
        try:
            batch = self._batch(tasks)
        except _AllAttemptsFailed as exc:
            # Reported to the main process, which stops with the failures counted.
            batch = {"_stats": {"fatal": exc.args[0], "failures": exc.args[1]}}
        stats = batch["_stats"]
        stats.update(self.reader.take_stats())
        stats.update(self.decodes)
        self.decodes.clear()
        if self.blocks is not None:
            stats.update(self.blocks.take_counts())
        stats["batch_s"] = time.perf_counter() - t_start
        return batch

    def _issue_reads(self, tasks: list[tuple]) -> list:
        """``(plan, read futures)`` per task: started by the previous call (read-ahead) or now;
        then the reads of this worker's next batch (``tasks.ahead``) are queued behind them, so
        storage latency hides behind this batch's decoding."""
        ahead, self._ahead = self._ahead, {}
        started = [ahead.pop(task, None) or self._start(task) for task in tasks]
        for _, futures in ahead.values():  # read ahead for a batch that never came
            for f in futures:
                if f is not None:
                    f.cancel()
        next_tasks = getattr(tasks, "ahead", ())  # a plain list from __getitem__ has none
        for task in next_tasks:
            self._ahead[task] = self._start(task)
        if self.blocks is not None:
            # The rest of these windows and the streams' next windows, in the background.
            self.blocks.prefetch([*tasks, *next_tasks])
        return started

    def _key(self, row: int) -> str:
        # Keys decoded per row: a decoded copy of the whole key column costs 4x its bytes in
        # every worker (hundreds of MB at AudioSet scale).
        return self.index.key_bytes[row].decode("utf-8")

    def _try(self, plan, futures, failures: list) -> tuple[dict | None, float]:
        """``(the decoded sample of one attempt, or None with the failure recorded, decode
        seconds)``."""
        try:
            pos_bytes = futures[0].result()
        except ReadFailure as exc:
            failures.append((self._key(plan.row), exc.reason, str(exc)))
            return None, 0.0
        try:
            neg_bytes = futures[1].result() if futures[1] is not None else None
        except ReadFailure as exc:
            failures.append((self._key(plan.neg_row), exc.reason, str(exc)))
            return None, 0.0
        t0 = time.perf_counter()
        try:
            return self._decode(plan, pos_bytes, neg_bytes), time.perf_counter() - t0
        except DecodeError as exc:
            failures.append((self._key(plan.row), exc.reason, str(exc)))
        except _NegativeFailed as exc:
            failures.append((self._key(plan.neg_row), exc.cause.reason, str(exc.cause)))
        except Exception as exc:  # anything else a broken stream can raise
            failures.append((self._key(plan.row), "decode_error", repr(exc)))
        return None, time.perf_counter() - t0

    def _sample(self, task: tuple, plan, futures, failures: list) -> tuple[dict, Any, float]:
        """``(sample, its plan, decode seconds)``: the task's clip, or its replacements."""
        epoch, pos, _row, mix = task
        decode_s = 0.0
        for attempt in range(MAX_ATTEMPTS):
            if attempt:
                plan = self._plan(epoch, pos, 0, mix_dict(mix), attempt)
                futures = self._fetch(plan, epoch, pos)
            sample, seconds = self._try(plan, futures, failures)
            decode_s += seconds
            if sample is not None:
                return sample, plan, decode_s
        raise _AllAttemptsFailed(
            f"{MAX_ATTEMPTS} clips in a row failed for global position {pos} of epoch "
            f"{epoch}; last: {failures[-1][1:] if failures else None}",
            failures,
        )

    def _batch(self, tasks: list[tuple]) -> dict[str, Any]:
        labels = self.index.label
        samples, failures, decode_s, fallbacks = [], [], 0.0, 0
        for task, (plan, futures) in zip(tasks, self._issue_reads(tasks), strict=True):
            sample, plan, seconds = self._sample(task, plan, futures, failures)
            decode_s += seconds
            epoch, pos = task[0], task[1]
            key = self._key(plan.row)
            sample.update(key=key, label=int(labels[plan.row]), position=pos, epoch=epoch)
            if isinstance(plan, ViewsPlan):
                sample.update(video_start=plan.video_start, video2_start=plan.video2_start)
            else:
                fallbacks += int(plan.fell_back)
                sample.update(
                    neg_key=self._key(plan.neg_row),
                    neg_kind=plan.neg_kind,
                    video_start=plan.video_start,
                    audio_start=plan.video_start,
                    neg_audio_start=plan.neg_start,
                )
            samples.append(sample)
        batch = _collate(samples)
        batch["_stats"] = {
            "decode_s": decode_s,
            "failures": failures,
            "fallback_easy": fallbacks,
            "clips": len(samples),
        }
        return batch


# Batch fields by type; a sample has those of its kind (AVTS pair or two views).
_MEDIA_FIELDS = ("video", "video2", "audio", "neg_audio")
_INT_FIELDS = ("neg_kind", "label", "position", "epoch")
_TIME_FIELDS = ("video_start", "video2_start", "audio_start", "neg_audio_start")


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    first = samples[0]
    batch: dict[str, Any] = {k: [s[k] for s in samples] for k in ("key", "neg_key") if k in first}
    for names, make in (
        (_MEDIA_FIELDS, _stack),
        (_INT_FIELDS, lambda values: torch.tensor(values, dtype=torch.long)),
        (_TIME_FIELDS, lambda values: torch.tensor(values, dtype=torch.float64)),
    ):
        batch.update({k: make([s[k] for s in samples]) for k in names if k in first})
    return batch
