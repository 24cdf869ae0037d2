"""The streaming AVTS pair loader: object storage to training batches on every rank.

``build_loader(cfg.data, rank=r, world_size=w)`` returns an :class:`AVLoader`. See
``docs/data-loading.md`` for the API and its guarantees; in short:

- global step ``k`` holds the same samples (clips, windows, augmentation, negatives) for any
  world size and any worker count: rank ``r`` takes its slice of the global batch;
- the state (:meth:`AVLoader.state_dict`) is the next global step and the negative-mix schedule:
  tiny, identical on every rank, restorable at any world size;
- a clip that fails is replaced deterministically, counted by reason, its key logged once; past
  ``data.max_skip_fraction`` failed clips, :class:`SkippedClipsError` stops training;
- ``data.access``: ``random`` reads clip by clip in a full shuffle; ``block`` reads runs of
  shards into a per-rank cache, in the two-level block order (:mod:`avts_dist.data.blocks`);
- ``video`` is uint8 ``[B, 3, T, H, W]``, a quarter of float32's bytes through worker queues and
  PCIe; the trainer normalises it on its device (:func:`avts_dist.train.batch.to_device`).
  ``pin_memory=True`` (the trainer's choice on CUDA) pins batches in torch's pin-memory thread,
  so host-to-device copies overlap compute.
- ``views=True`` (``train.objective=video_ssl``): each sample is two windows of one clip
  (``video``, ``video2``), no audio decoded; the sample order is the same as for AVTS pairs.

Worker processes and prefetching come from torchdata's ``StatefulDataLoader``; the
authoritative position is ours (the global step), so its own state is never needed: a restore
or a mix change simply restarts the pipeline at the right global step.
"""

from __future__ import annotations

import gc
import logging
import time
import warnings
from collections import Counter
from concurrent.futures import Future
from typing import Any

import fsspec
import numpy as np
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from avts_dist.config import DataConfig
from avts_dist.data.blockcache import BlockCache, cache_base_dir
from avts_dist.data.blockreads import BlockReads
from avts_dist.data.blocks import BlockSampler, auto_streams
from avts_dist.data.decode import DecodeError, audio_window, decode_audio, decode_video, logmel
from avts_dist.data.health import SkipBudget, SkippedClipsError, check_shards
from avts_dist.data.index import DatasetError, DatasetIndex
from avts_dist.data.pairs import (
    NEGATIVE_KINDS,
    PairPlan,
    ViewsPlan,
    mix_probabilities,
    plan_pair,
    plan_views,
)
from avts_dist.data.reader import ClipReader, ReadFailure
from avts_dist.data.sampler import GlobalSampler, LoaderState, MixSchedule, sample_rng

__all__ = ["AVLoader", "SkippedClipsError", "build_loader", "resolve_access"]

log = logging.getLogger(__name__)
# torchdata 0.11 calls a deprecated torch API on every iterator: noise, not a problem of ours.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")

MEDIA_EXT = "mp4"
# A sample whose clip (or negative) keeps failing is replaced at most this many times.
MAX_ATTEMPTS = 32
# Block access draws replacements from the sample's window (in memory) this many times, then
# from the whole split: a window can be small, or all bad (a corrupt shard).
WINDOW_ATTEMPTS = 4
_MIX_KEYS = NEGATIVE_KINDS
_LOCAL_PROTOCOLS = ("file", "local", "memory")
# Counters summed from the workers' per-batch stats into telemetry().
_SUMMED = (
    "bytes_read",
    "retries",
    "requests",
    "read_failures",
    "read_s",
    "decode_s",
    "batch_s",
    "clips",
    "fallback_easy",
    "video_decodes",
    "audio_decodes",
    "block_fallback_reads",
    "outside_block_reads",
)


def resolve_access(cfg: DataConfig, url: str, train: bool) -> str:
    """``random`` or ``block``: evaluation always reads clip by clip; ``auto`` is block for
    remote storage and random for local paths (a page cache serves random reads well, and the
    full shuffle is better)."""
    if not train:
        return "random"
    if cfg.access != "auto":
        return cfg.access
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    return "random" if protocol in _LOCAL_PROTOCOLS else "block"


def _mix_tuple(mix: dict[str, float]) -> tuple[float, ...]:
    return tuple(float(mix.get(k, 0.0)) for k in _MIX_KEYS)


def _mix_dict(mix: tuple[float, ...]) -> dict[str, float]:
    return {k: v for k, v in zip(_MIX_KEYS, mix, strict=True) if v > 0}


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack``; in a worker, straight into shared memory (as torch's default_collate
    does), which saves the copy the result queue would otherwise make."""
    out = None
    if torch.utils.data.get_worker_info() is not None:
        elem = tensors[0]
        storage = elem._typed_storage()._new_shared(len(tensors) * elem.numel(), device=elem.device)
        out = elem.new(storage).resize_(len(tensors), *elem.shape)
    return torch.stack(tensors, 0, out=out)


def _release_cached_remote_fs(url: str) -> None:
    """Lets fsspec's cached instances of a remote filesystem go before workers fork: a child
    drops the cache it inherits and would close those S3 clients on its own event loop (asyncio
    errors on stderr). Instances still in use elsewhere are untouched; new ones are made."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol not in _LOCAL_PROTOCOLS:
        fsspec.get_filesystem_class(protocol).clear_instance_cache()
        gc.collect()


def _identity(batch: Any) -> Any:
    return batch


def _worker_init(_: int) -> None:
    # Workers decode on one thread each: parallelism comes from the number of workers.
    torch.set_num_threads(1)


class _AllAttemptsFailed(Exception):
    pass


class _PairDataset(torch.utils.data.Dataset):
    """Turns a list of sample tasks ``(epoch, position, row, mix)`` into one collated batch
    (AVTS pairs, or with ``views`` two video windows of each clip).

    All reads of the batch are issued first (bounded by the reader's pool), then the clips are
    decoded in order while later reads are still in flight. With block access (``blocks``) the
    reads come from the rank's block cache and candidates are the sample's window.
    """

    def __init__(
        self,
        cfg: DataConfig,
        index: DatasetIndex,
        pool: np.ndarray,
        video_ids: np.ndarray,
        train: bool,
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
        self.reader = ClipReader(
            index,
            storage_options=cfg.storage_options or None,
            max_retries=cfg.max_retries,
            retry_backoff_s=cfg.retry_backoff_s,
            concurrency=cfg.prefetch,
        )
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
        plan = self._plan(epoch, pos, row, _mix_dict(mix), 0)
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
                uint8=True, decoder=cfg.video_decoder,
            )  # fmt: skip
        return views

    def _decode(self, plan: PairPlan | ViewsPlan, pos_bytes: bytes, neg_bytes: bytes | None) -> dict:
        if isinstance(plan, ViewsPlan):
            return self._decode_views(plan, pos_bytes)
        cfg = self.cfg
        aug = np.random.Generator(np.random.Philox(plan.aug_seed))
        self.decodes["video_decodes"] += 1
        video = decode_video(
            pos_bytes, plan.video_start, cfg.num_frames, cfg.fps, cfg.size, self.train, aug,
            uint8=True, decoder=cfg.video_decoder,
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
            exc.neg = True  # the negative's clip failed: its key is the one to report
            raise
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

    def _batch(self, tasks: list[tuple]) -> dict[str, Any]:
        # Keys decoded per row: a decoded copy of the whole key column costs 4x its bytes in
        # every worker (hundreds of MB at AudioSet scale).
        key_bytes = self.index.key_bytes

        def key(row: int) -> str:
            return key_bytes[row].decode("utf-8")

        labels = self.index.label
        # Reads of this batch: started by the previous call (read-ahead) or now.
        ahead, self._ahead = self._ahead, {}
        plans, pending = [], []
        for task in tasks:
            plan, futures = ahead.pop(task, None) or self._start(task)
            plans.append(plan)
            pending.append(futures)
        for _, futures in ahead.values():  # read ahead for a batch that never came
            for f in futures:
                if f is not None:
                    f.cancel()
        # Then the reads of this worker's next batch, queued behind ours: storage latency
        # hides behind this batch's decoding.
        for task in getattr(tasks, "ahead", ()):
            self._ahead[task] = self._start(task)
        if self.blocks is not None:
            # The rest of these windows and the streams' next windows, in the background.
            self.blocks.prefetch([*tasks, *getattr(tasks, "ahead", ())])
        samples, failures, decode_s, fallbacks = [], [], 0.0, 0
        for i, (epoch, pos, _row, mix) in enumerate(tasks):
            plan, futures = plans[i], pending[i]
            for attempt in range(MAX_ATTEMPTS):
                if attempt:
                    plan = self._plan(epoch, pos, 0, _mix_dict(mix), attempt)
                    futures = self._fetch(plan, epoch, pos)
                try:
                    pos_bytes = futures[0].result()
                except ReadFailure as exc:
                    failures.append((key(plan.row), exc.reason, str(exc)))
                    continue
                try:
                    neg_bytes = futures[1].result() if futures[1] is not None else None
                except ReadFailure as exc:
                    failures.append((key(plan.neg_row), exc.reason, str(exc)))
                    continue
                t0 = time.perf_counter()
                try:
                    sample = self._decode(plan, pos_bytes, neg_bytes)
                except DecodeError as exc:
                    bad = plan.neg_row if getattr(exc, "neg", False) else plan.row
                    failures.append((key(bad), exc.reason, str(exc)))
                    continue
                except Exception as exc:  # anything else a broken stream can raise
                    failures.append((key(plan.row), "decode_error", repr(exc)))
                    continue
                finally:
                    decode_s += time.perf_counter() - t0
                break
            else:
                raise _AllAttemptsFailed(
                    f"{MAX_ATTEMPTS} clips in a row failed for global position {pos} of epoch "
                    f"{epoch}; last: {failures[-1][1:] if failures else None}",
                    failures,
                )
            sample.update(key=key(plan.row), label=int(labels[plan.row]), position=pos, epoch=epoch)
            if isinstance(plan, ViewsPlan):
                sample.update(video_start=plan.video_start, video2_start=plan.video2_start)
            else:
                fallbacks += int(plan.fell_back)
                sample.update(
                    neg_key=key(plan.neg_row),
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


class _Tasks(list):
    """One batch's tasks, plus ``ahead``: the tasks of the same worker's next batch."""

    ahead: list = []


class _StepSampler:
    """Batch sampler: for each global step from ``start`` (to ``end``, or forever), the tasks
    of this rank's slice. Runs in the main process; the schedule is a snapshot."""

    def __init__(
        self,
        sampler: GlobalSampler,
        schedule: MixSchedule,
        rank: int,
        world_size: int,
        start: int,
        end: int | None,
        stride: int = 1,
    ) -> None:
        self.sampler = sampler
        self.schedule = MixSchedule(list(schedule.entries))
        self.rank, self.world_size = rank, world_size
        self.start, self.end = start, end
        self.stride = max(1, stride)

    def tasks(self, step: int) -> _Tasks:
        epoch = self.sampler.epoch_of(step)
        mix = _mix_tuple(self.schedule.at(step))
        return _Tasks(
            (epoch, p, self.sampler.row_at(epoch, p), mix)
            for p in self.sampler.positions(step, self.rank, self.world_size)
        )

    def __iter__(self):
        step = self.start
        while self.end is None or step < self.end:
            tasks = self.tasks(step)
            # Workers take batches round-robin: this worker's next batch is num_workers on.
            nxt = step + self.stride
            if self.end is None or nxt < self.end:
                tasks.ahead = list(self.tasks(nxt))
            yield tasks
            step += 1

    def __len__(self) -> int:
        if self.end is None:
            raise TypeError("infinite loader has no length")
        return max(0, self.end - self.start)


class AVLoader:
    """Iterable of AVTS pair batches for one rank; see the module docstring."""

    def __init__(
        self,
        cfg: DataConfig,
        index: DatasetIndex,
        pool: np.ndarray,
        video_ids: np.ndarray,
        *,
        rank: int,
        world_size: int,
        split: str,
        train: bool,
        infinite: bool,
        filtered: dict[str, int],
        access: str = "random",
        build_stats: dict[str, Any] | None = None,
        pin_memory: bool = False,
        views: bool = False,
    ) -> None:
        self.cfg = cfg
        self.pin_memory = pin_memory
        self.index = index
        self.rank, self.world_size = rank, world_size
        self.split = split
        self.train = train
        self.infinite = infinite
        self.access = access
        self.local_batch_size = cfg.global_batch_size // world_size
        drop_last = cfg.drop_last if train else False
        self.cache: BlockCache | None = None
        self.cache_bound_bytes = 0
        if access == "block":
            self.sampler = _block_sampler(cfg, index, pool, drop_last)
            self.cache_bound_bytes = _cache_bound(self.sampler, cfg, rank, world_size)
            base = cache_base_dir(cfg.block_cache_dir, self.cache_bound_bytes)
            self.cache = BlockCache.create(base, rank)
        else:
            self.sampler = GlobalSampler(
                pool, cfg.global_batch_size, cfg.seed, shuffle=train, drop_last=drop_last
            )
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.num_epochs = None if infinite else (max(1, cfg.epochs) if train else 1)
        blocks = (self.sampler, self.cache) if self.cache is not None else None
        self.dataset = _PairDataset(
            cfg, index, self.sampler.pool, video_ids, train, blocks, views=views
        )
        if self.dataset.blocks is not None and self.num_epochs is not None:
            self.dataset.blocks.last_epoch = self.num_epochs - 1
        self.schedule = MixSchedule([(0, cfg.initial_negative_mix)])
        self.global_step = 0
        self._iter = None
        self._dirty = True
        self._logged: set[str] = set()
        self._filtered = dict(filtered)
        self._build = dict(build_stats or {})
        self._tel: Counter = Counter()
        self._tel.update({k: v for k, v in self._build.items() if isinstance(v, (int, float))})
        self._skipped: Counter = Counter()
        self._budget = SkipBudget(cfg.max_skip_fraction)
        self._t_first: float | None = None

    @property
    def order_fingerprint(self) -> str:
        fingerprint = getattr(self.sampler, "order_fingerprint", None)
        return fingerprint() if fingerprint is not None else "random"

    # ---- position ----

    @property
    def epoch(self) -> int:
        return self.sampler.epoch_of(self.global_step)

    @property
    def end_step(self) -> int | None:
        return None if self.num_epochs is None else self.num_epochs * self.steps_per_epoch

    def __len__(self) -> int:
        end = self.end_step
        if end is None:
            raise TypeError("an infinite loader has no length (see steps_per_epoch)")
        return end

    # ---- iteration ----

    def _make_pipeline(self):
        cfg = self.cfg
        batch_sampler = _StepSampler(
            self.sampler,
            self.schedule,
            self.rank,
            self.world_size,
            self.global_step,
            self.end_step,
            stride=cfg.num_workers,
        )
        kwargs: dict[str, Any] = {}
        if cfg.num_workers > 0:
            kwargs.update(prefetch_factor=2, worker_init_fn=_worker_init)
            _release_cached_remote_fs(cfg.url)
        dl = StatefulDataLoader(
            self.dataset,
            batch_sampler=batch_sampler,
            num_workers=cfg.num_workers,
            collate_fn=_identity,
            pin_memory=self.pin_memory,
            **kwargs,
        )
        return iter(dl)

    def _close_pipeline(self) -> None:
        it, self._iter = self._iter, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def __iter__(self):
        if not self.train:
            # Evaluation: every pass is the same fixed set of windows and negatives.
            self.global_step = 0
            self._dirty = True
        try:
            while self.end_step is None or self.global_step < self.end_step:
                if self.cache is not None:
                    self._evict()
                if self._dirty or self._iter is None:
                    self._close_pipeline()
                    self._iter = self._make_pipeline()
                    self._dirty = False
                if self._t_first is None:
                    self._t_first = time.perf_counter()
                t0 = time.perf_counter()
                batch = next(self._iter)
                self._tel["wait_s"] += time.perf_counter() - t0
                self._account(batch.pop("_stats"))
                self.global_step += 1
                yield batch
        finally:
            self._close_pipeline()

    def _account(self, stats: dict[str, Any]) -> None:
        for name in _SUMMED:
            self._tel[name] += stats.get(name, 0)
        for key, reason, message in stats["failures"]:
            self._skipped[reason] += 1
            if key not in self._logged:
                self._logged.add(key)
                log.warning("data: replacing clip %s (%s): %s", key, reason, message)
        self._budget.add(stats.get("clips", 0), [reason for _, reason, _ in stats["failures"]])
        where = f"data {self.cfg.url!r} split {self.split!r}"
        if "fatal" in stats:
            raise SkippedClipsError(f"{where}: {stats['fatal']}; {self._budget.describe()}")
        self._budget.check(where)

    def _evict(self) -> None:
        """Drops the cached pieces of windows whose samples were all handed out."""
        step = self.global_step
        epoch, within = self.sampler.epoch_of(step), step % self.steps_per_epoch
        finished = self.sampler.blocks(epoch).piece_last_step < within

        def done(piece_epoch: int, piece: int) -> bool:
            return piece_epoch < epoch or (piece_epoch == epoch and bool(finished[piece]))

        kept = self.cache.evict(done)
        self._tel["block_cache_bytes"] = kept
        self._tel["block_cache_peak_bytes"] = max(self._tel["block_cache_peak_bytes"], kept)

    # ---- curriculum ----

    @property
    def negative_mix(self) -> dict[str, float]:
        return dict(self.schedule.at(self.global_step))

    def set_negative_mix(self, mix: dict[str, float]) -> None:
        """Uses ``mix`` from the next global step on (recorded, so a resume replays it)."""
        mix = {str(k): float(v) for k, v in dict(mix).items()}
        unknown = set(mix) - set(NEGATIVE_KINDS)
        if unknown:
            raise ValueError(f"unknown negative kind(s) {sorted(unknown)}; use {NEGATIVE_KINDS}")
        mix_probabilities(mix)  # validates weights
        mix = {k: v for k, v in mix.items() if v > 0}
        if self.schedule.set_from(self.global_step, mix):
            # Batches already prefetched used the old mix: restart at the next step.
            self._dirty = True

    # ---- state ----

    def state_dict(self) -> dict[str, Any]:
        return LoaderState(
            global_step=int(self.global_step),
            epoch=int(self.epoch),
            mix_schedule=self.schedule.to_list(),
            seed=int(self.cfg.seed),
            global_batch_size=int(self.cfg.global_batch_size),
            num_samples=len(self.sampler),
            order=self.order_fingerprint,
        ).to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        st = LoaderState.from_dict(state)
        mismatch = [
            f"{name}: saved {saved}, now {now}"
            for name, saved, now in (
                ("seed", st.seed, self.cfg.seed),
                ("global_batch_size", st.global_batch_size, self.cfg.global_batch_size),
                ("num_samples", st.num_samples, len(self.sampler)),
                ("order (data.access, data.block_*)", st.order, self.order_fingerprint),
            )
            if saved != now
        ]
        if mismatch:
            raise ValueError(
                "loader state does not match this dataset/config (" + "; ".join(mismatch) + ")"
            )
        self.global_step = st.global_step
        self.schedule = MixSchedule.from_list(st.mix_schedule)
        self._dirty = True

    # ---- telemetry ----

    def telemetry(self) -> dict[str, Any]:
        """Counters since the loader was built (documented in docs/data-loading.md)."""
        elapsed = time.perf_counter() - self._t_first if self._t_first else 0.0
        tel = self._tel
        clips = int(tel["clips"])
        return {
            "access": self.access,
            "clips": clips,
            "clips_per_s": clips / elapsed if elapsed > 0 else 0.0,
            "bytes_read": int(tel["bytes_read"]),
            "requests": int(tel["requests"]),
            "decode_s": float(tel["decode_s"]),
            "read_s": float(tel["read_s"]),
            "wait_s": float(tel["wait_s"]),
            "retries": int(tel["retries"]),
            "read_failures": int(tel["read_failures"]),
            "video_decodes": int(tel["video_decodes"]),
            "audio_decodes": int(tel["audio_decodes"]),
            "audio_decodes_per_sample": tel["audio_decodes"] / clips if clips else 0.0,
            "fallback_easy": int(tel["fallback_easy"]),
            "block_fallback_reads": int(tel["block_fallback_reads"]),
            "outside_block_reads": int(tel["outside_block_reads"]),
            "block_cache_mb": tel["block_cache_bytes"] / 2**20,
            "block_cache_peak_mb": tel["block_cache_peak_bytes"] / 2**20,
            "block_cache_bound_mb": self.cache_bound_bytes / 2**20,
            "skipped": dict(self._skipped),
            "skipped_total": int(sum(self._skipped.values())),
            "skip_fraction": self._budget.fraction,
            "filtered": dict(self._filtered),
            "missing_shards": list(self._build.get("missing_shards", [])),
            "global_step": int(self.global_step),
            "epoch": int(self.epoch),
        }

    def close(self) -> None:
        self._close_pipeline()
        # Reads made in this process after its last batch (read-ahead, prefetch) still count.
        if self.dataset.blocks is not None:
            self.dataset.blocks.close(wait=True)
        self.dataset.reader.close(wait=True)
        for name, value in self.dataset.reader.take_stats().items():
            self._tel[name] += value
        if self.cache is not None:
            self.cache.close()


def _block_sampler(
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


def _cache_bound(sampler: BlockSampler, cfg: DataConfig, rank: int, world_size: int) -> int:
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


def _usable(index: DatasetIndex, rows: np.ndarray, clip_s: float) -> tuple[np.ndarray, dict]:
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


def _check_storage(
    cfg: DataConfig, index: DatasetIndex, pool: np.ndarray, split: str, filtered: dict
) -> tuple[np.ndarray, dict[str, Any]]:
    """Fails at build, not in a worker: shards missing from storage (or their clips left out,
    counted in ``filtered``), and one ranged read of a clip (unreadable URL, permissions)."""
    reader = ClipReader(
        index,
        storage_options=cfg.storage_options or None,
        max_retries=cfg.max_retries,
        retry_backoff_s=cfg.retry_backoff_s,
        concurrency=1,
    )
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


def build_loader(
    cfg: DataConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    split: str | None = None,
    train: bool = True,
    infinite: bool | None = None,
    pin_memory: bool = False,
    views: bool = False,
) -> AVLoader:
    """The loader of rank ``rank`` of ``world_size``; clear errors for unusable datasets.

    ``views``: two video windows per sample (``video``, ``video2``) instead of an AVTS pair.
    The pool is the same (clips with audio too), so both objectives see the same clip order.

    ``split`` defaults to ``cfg.split`` (training) or ``cfg.val_split`` (``train=False``).
    ``infinite`` defaults to ``cfg.epochs == 0`` for training and False for evaluation.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if cfg.global_batch_size % world_size:
        raise ValueError(
            f"data.global_batch_size ({cfg.global_batch_size}) must be divisible by the world "
            f"size ({world_size})"
        )
    split = split or (cfg.split if train else cfg.val_split)
    index = DatasetIndex.load(cfg.url, cfg.storage_options or None)
    all_rows = index.rows(split=split, status=None)
    if all_rows.size == 0:
        raise DatasetError(
            f"split {split!r} of dataset {cfg.url!r} is empty or absent (splits: {index.splits})"
        )
    pool, filtered = _usable(index, all_rows, cfg.num_frames / cfg.fps)
    pool, build_stats = _check_storage(cfg, index, pool, split, filtered)
    if pool.size == 0:
        raise DatasetError(
            f"no usable clip in split {split!r} of {cfg.url!r}: {sum(filtered.values())} clips "
            f"filtered out ({filtered}); clips need status ok, audio, video and >= "
            f"{cfg.num_frames / cfg.fps:.3f}s"
        )
    drop_last = cfg.drop_last if train else False
    if drop_last and pool.size < cfg.global_batch_size:
        raise DatasetError(
            f"split {split!r} of {cfg.url!r} has {pool.size} usable clips, fewer than one "
            f"global batch ({cfg.global_batch_size})"
        )
    if "video_id" in index.extra_columns:
        video_ids = np.asarray(index.column("video_id"))
    else:
        video_ids = index.key_bytes
    if infinite is None:
        infinite = train and cfg.epochs == 0
    return AVLoader(
        cfg,
        index,
        pool,
        video_ids,
        rank=rank,
        world_size=world_size,
        split=split,
        train=train,
        infinite=bool(infinite),
        filtered=filtered,
        access=resolve_access(cfg, cfg.url, train),
        build_stats=build_stats,
        pin_memory=pin_memory,
        views=views,
    )
