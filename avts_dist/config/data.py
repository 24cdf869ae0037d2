"""``data``: the dataset, the batch, the clip geometry, and how clips are read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from avts_dist.config.common import check_mix, fail

__all__ = ["VIDEO_DECODERS", "DataConfig"]

# The video decoders data.video_decoder names (avts_dist/data/frames.py).
VIDEO_DECODERS = ("torchcodec", "pyav", "decord")


@dataclass
class DataConfig:
    url: str = "data/synth"
    split: str = "train"
    val_split: str = "val"
    # fsspec options for the dataset's filesystem (merged over the environment's defaults).
    storage_options: dict[str, Any] = field(default_factory=dict)
    global_batch_size: int = 8
    seed: int = 0
    num_workers: int = 1
    # Clip reads in flight per worker (bounded concurrency, prefetched).
    prefetch: int = 8
    num_frames: int = 8
    fps: float = 8.0
    size: int = 32
    sample_rate: int = 16000
    num_mel_bins: int = 40
    mel_win_ms: float = 25.0
    mel_hop_ms: float = 10.0
    # Super-hard negatives are offset by at least this many seconds (and less than a clip).
    min_shift: float = 0.25
    # Mix of the extra negative's kind; empty means {"easy": 1.0}. In training it is the mix of
    # every curriculum stage that names none (a stage that names its own makes this an error).
    # The default must be empty: OmegaConf merges a YAML mapping into a default one ({hard: 1}
    # would gain easy: 1).
    negative_mix: dict[str, float] = field(default_factory=dict)
    # The run's one epoch knob: passes over the split; 0 means an endless stream (the run is
    # then as long as train.max_steps). With both set, the run stops at whichever comes first.
    epochs: int = 0
    drop_last: bool = True
    max_retries: int = 4
    retry_backoff_s: float = 0.1
    # auto | torchcodec | pyav | decord: the video decoder; auto is the fastest that loads here
    # (torchcodec, then pyav, then decord: docs/benchmarks.md), checked at start. All three
    # agree on the frames.
    video_decoder: str = "auto"
    # How training reads clips (docs/data-loading.md): "random" = one ranged read per clip, a
    # full shuffle; "block" = contiguous runs of a shard (block_mb each) served from a per-rank
    # cache, a two-level shuffle (blocks permuted, samples shuffled within windows of
    # shuffle_window_blocks blocks of a stream); "auto" = block for remote URLs (s3://, gs://,
    # ...), random for local paths. Evaluation always reads clip by clip.
    access: str = "auto"
    block_mb: float = 32.0
    # A gap between wanted clips (other splits) up to this is read through rather than paying a
    # new request: first-byte latency x stream bandwidth (20 ms x 100 MB/s; docs/data-loading.md).
    block_read_through_mb: float = 2.0
    shuffle_window_blocks: int = 2
    # Parallel streams of blocks in the global order (each rank reads only its streams' blocks);
    # 0 = the largest divisor of global_batch_size <= 256. Part of the order: fixed for a run.
    block_streams: int = 0
    # Where the block cache lives; empty = /dev/shm when it has room, else the temp directory.
    block_cache_dir: str = ""
    # A shard listed in the index but absent stops the build unless this is true (then its
    # clips are left out, with a warning giving the share of data lost).
    allow_missing_shards: bool = False
    # Training stops (SkippedClipsError) when more than this share of the clips tried failed.
    max_skip_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.video_decoder != "auto" and self.video_decoder not in VIDEO_DECODERS:
            fail(
                "data.video_decoder",
                f"{self.video_decoder!r} is not auto or one of {VIDEO_DECODERS}",
            )
        for name in ("global_batch_size", "num_frames", "size", "sample_rate", "num_mel_bins"):
            if getattr(self, name) <= 0:
                fail(f"data.{name}", f"must be > 0, got {getattr(self, name)}")
        if self.num_workers < 0:
            fail("data.num_workers", "must be >= 0")
        if self.fps <= 0:
            fail("data.fps", f"must be > 0, got {self.fps}")
        if self.epochs < 0:
            fail("data.epochs", "must be >= 0 (0 = infinite)")
        clip_s = self.num_frames / self.fps
        if not 0 < self.min_shift < clip_s:
            fail(
                "data.min_shift",
                f"must be in (0, clip length {clip_s:.3f}s = num_frames/fps), got {self.min_shift}",
            )
        if self.negative_mix:
            check_mix("data.negative_mix", dict(self.negative_mix))
        if self.access not in ("auto", "random", "block"):
            fail("data.access", f"must be auto, random or block, got {self.access!r}")
        if not self.block_mb > 0:
            fail("data.block_mb", f"must be > 0 (MB), got {self.block_mb}")
        if self.block_read_through_mb < 0:
            fail("data.block_read_through_mb", f"must be >= 0, got {self.block_read_through_mb}")
        if self.shuffle_window_blocks < 1:
            fail("data.shuffle_window_blocks", f"must be >= 1, got {self.shuffle_window_blocks}")
        if self.block_streams < 0 or (
            self.block_streams and self.global_batch_size % self.block_streams
        ):
            fail(
                "data.block_streams",
                f"must be 0 (auto) or divide data.global_batch_size "
                f"({self.global_batch_size}), got {self.block_streams}",
            )
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            fail("data.max_skip_fraction", f"must be in [0, 1], got {self.max_skip_fraction}")

    @property
    def initial_negative_mix(self) -> dict[str, float]:
        return dict(self.negative_mix) or {"easy": 1.0}

    @property
    def clip_seconds(self) -> float:
        return self.num_frames / self.fps
