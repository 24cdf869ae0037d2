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

This module is the main process's side (the step order, state, telemetry, ``build_loader``);
the worker side is :mod:`avts_dist.data.dataset`, the build-time checks :mod:`.checks`.

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
from typing import Any

import fsspec
import numpy as np
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from avts_dist.config import DataConfig
from avts_dist.data.blockcache import BlockCache, cache_base_dir
from avts_dist.data.checks import (
    block_sampler,
    cache_bound,
    check_storage,
    clip_reader,
    resolve_access,
    usable_rows,
)
from avts_dist.data.dataset import PairDataset, Tasks, mix_tuple
from avts_dist.data.decoders import resolve_video_decoder
from avts_dist.data.health import SkipBudget, SkippedClipsError
from avts_dist.data.index import DatasetError, DatasetIndex
from avts_dist.data.pairs import NEGATIVE_KINDS, mix_probabilities
from avts_dist.data.sampler import GlobalSampler, LoaderState, MixSchedule
from avts_dist.storage import is_remote

__all__ = ["AVLoader", "SkippedClipsError", "build_loader", "resolve_access"]

log = logging.getLogger("avts.data")
# torchdata 0.11 calls a deprecated torch API on every iterator: noise, not a problem of ours.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")

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


def _release_cached_remote_fs(url: str) -> None:
    """Lets fsspec's cached instances of a remote filesystem go before workers fork: a child
    drops the cache it inherits and would close those S3 clients on its own event loop (asyncio
    errors on stderr). Instances still in use elsewhere are untouched; new ones are made."""
    if is_remote(url):
        fsspec.get_filesystem_class(url.split("://", 1)[0]).clear_instance_cache()
        gc.collect()


def _identity(batch: Any) -> Any:
    return batch


def _worker_init(_: int) -> None:
    # Workers decode on one thread each: parallelism comes from the number of workers.
    torch.set_num_threads(1)


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

    def tasks(self, step: int) -> list[tuple]:
        epoch = self.sampler.epoch_of(step)
        mix = mix_tuple(self.schedule.at(step))
        return [
            (epoch, p, self.sampler.row_at(epoch, p), mix)
            for p in self.sampler.positions(step, self.rank, self.world_size)
        ]

    def __iter__(self):
        step = self.start
        while self.end is None or step < self.end:
            # Workers take batches round-robin: this worker's next batch is num_workers on.
            nxt = step + self.stride
            ahead = self.tasks(nxt) if self.end is None or nxt < self.end else ()
            yield Tasks(self.tasks(step), ahead)
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
        video_decoder: str | None = None,
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
            self.sampler = block_sampler(cfg, index, pool, drop_last)
            self.cache_bound_bytes = cache_bound(self.sampler, cfg, rank, world_size)
            base = cache_base_dir(cfg.block_cache_dir, self.cache_bound_bytes)
            self.cache = BlockCache.create(base, rank)
        else:
            self.sampler = GlobalSampler(
                pool, cfg.global_batch_size, cfg.seed, shuffle=train, drop_last=drop_last
            )
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.num_epochs = None if infinite else (max(1, cfg.epochs) if train else 1)
        blocks = (self.sampler, self.cache) if self.cache is not None else None
        # The decoder build_loader checked; "auto" is never passed on to the workers.
        self.video_decoder = video_decoder or resolve_video_decoder(cfg.video_decoder)
        self.dataset = PairDataset(
            cfg,
            index,
            self.sampler.pool,
            video_ids,
            train,
            clip_reader(cfg, index, concurrency=cfg.prefetch),
            self.video_decoder,
            blocks,
            views=views,
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
            "video_decoder": self.video_decoder,
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
    # Before any read: a decoder that cannot load would fail every clip, one at a time.
    video_decoder = resolve_video_decoder(cfg.video_decoder)
    split = split or (cfg.split if train else cfg.val_split)
    index = DatasetIndex.load(cfg.url, cfg.storage_options or None)
    all_rows = index.rows(split=split, status=None)
    if all_rows.size == 0:
        raise DatasetError(
            f"split {split!r} of dataset {cfg.url!r} is empty or absent (splits: {index.splits})"
        )
    pool, filtered = usable_rows(index, all_rows, cfg.num_frames / cfg.fps)
    pool, build_stats = check_storage(cfg, index, pool, split, filtered)
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
        video_decoder=video_decoder,
    )
