"""Block access benchmark: requests and bytes per sample from S3, shuffle quality, memory over
10,000 samples, and the same layout at AudioSet scale. Writes one JSON file.

    .venv/bin/python tests/benchmarks/bench_blocks.py --out bench_blocks.json [--quick]

- ``requests``: the loader on a moto S3 server, through a counting HTTP proxy, world size 2
  (one worker per rank), 2 epochs, negative mix 1:1:1: GET requests per sample (every GET the
  proxy saw: index, listings, probe and block reads) and bytes of shard bodies per sample over
  the mean clip (mp4 member) size; random access on the same run for comparison; decode calls
  per sample from the loader's counters.
- ``shuffle``: from the samplers alone (no I/O), on an index of 100,000 clips in 100 shards:
  Spearman correlation between dataset order and visit order, and the share of same-shard pairs
  within a global batch, for block access, a full random shuffle and a webdataset-style pipeline
  (shards shuffled and dealt to the consumers, a 1,000-sample shuffle buffer per consumer, each
  batch from one consumer).
- ``rss``: resident memory of each loader process (main, 2 workers) every 1,000 samples over
  10,000 samples of a small corpus repeated, and the block cache (tmpfs) against its bound.
- ``split_layout``: issue 22's set-up (``avts synth`` 960 clips, 240 per shard, only the labelled
  pool beside train, batch 6, world size 2, moto S3): GETs and bytes per sample in the second of
  three epochs, against the formula of docs/data-loading.md (``predict_block_reads``).
- ``at_scale``: the block layout of AudioSet-2M (assumed clip sizes and shards, stated in the
  JSON) at 8, 64 and 512 ranks: GET requests and bytes per sample, cache bound per rank.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

from avts_dist.config import DataConfig  # noqa: E402
from avts_dist.data import DatasetIndex, build_loader  # noqa: E402
from avts_dist.data.blocks import BlockSampler, auto_streams  # noqa: E402
from avts_dist.data.sampler import GlobalSampler  # noqa: E402
from avts_dist.data.synthetic import synthesize  # noqa: E402
from tests.benchmarks.bench_loader import start_moto  # noqa: E402
from tests.fixtures.faulty_s3 import FaultyS3Proxy  # noqa: E402

torch.set_num_threads(1)
MIX3 = {"easy": 1.0, "hard": 1.0, "superhard": 1.0}
# The per-sample work of every loader run here: 8 frames at 8 fps, mix 1:1:1.
SAMPLE = dict(num_frames=8, fps=8.0, negative_mix=MIX3)


# ---- requests and bytes per sample, through a counting proxy ----


def run_ranks(cfg: DataConfig, world_size: int) -> dict:
    """All ranks of one world size, one after the other (each with its own cache)."""
    totals: dict = {"samples": 0}
    t0 = time.perf_counter()
    for rank in range(world_size):
        loader = build_loader(cfg, rank=rank, world_size=world_size)
        for batch in loader:
            totals["samples"] += len(batch["key"])
        loader.close()
        tel = loader.telemetry()
        for name in ("requests", "retries", "bytes_read", "video_decodes", "audio_decodes"):
            totals[name] = totals.get(name, 0) + tel[name]
        totals["block_cache_peak_mb"] = max(
            totals.get("block_cache_peak_mb", 0.0), tel["block_cache_peak_mb"]
        )
        totals["block_cache_bound_mb"] = tel["block_cache_bound_mb"]
    totals["seconds"] = time.perf_counter() - t0
    return totals


def requests_per_sample(work: Path, quick: bool) -> dict:
    corpus = dict(num_videos=160 if quick else 640, seconds=3.0, fps=24.0, size=96)
    corpus |= dict(sample_rate=16000, num_classes=4, shard_size=64, seed=0, val_fraction=0.0)
    local = str(work / "req")
    synthesize(local, num_workers=2, **corpus)
    idx = DatasetIndex.load(local)
    mean_clip = float(idx.size[idx.rows("train"), 0].mean())
    proc, endpoint = start_moto()
    try:
        import s3fs

        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
        fs.mkdir("bench")
        fs.put(local, "bench/ds", recursive=True)
        out: dict = {"corpus": corpus, "mean_clip_bytes": mean_clip, "world_size": 2}
        for access in ("block", "random"):
            proxy = FaultyS3Proxy(endpoint, fail_every=0).start()
            cfg = DataConfig(
                url="s3://bench/ds",
                storage_options={"client_kwargs": {"endpoint_url": proxy.endpoint}},
                access=access,
                global_batch_size=16,
                block_streams=4,
                num_workers=1,
                size=64,
                epochs=2,
                seed=1,
                **SAMPLE,
            )
            try:
                run = run_ranks(cfg, 2)
            finally:
                proxy.stop()
            n = run["samples"]
            out[access] = {
                **run,
                "proxy_gets": proxy.gets,
                "proxy_ranged_gets": proxy.ranged_gets,
                "proxy_ranged_bytes": proxy.ranged_bytes,
                "gets_per_sample": proxy.gets / n,
                "bytes_per_sample_over_clip": proxy.ranged_bytes / n / mean_clip,
                "video_decodes_per_sample": run["video_decodes"] / n,
                "audio_decodes_per_sample": run["audio_decodes"] / n,
            }
            print(access, json.dumps(out[access]), flush=True)
        out["config"] = {
            "global_batch_size": 16,
            "block_streams": 4,
            "block_mb": cfg.block_mb,
            "shuffle_window_blocks": cfg.shuffle_window_blocks,
            "num_workers": 1,
            "epochs": 2,
            "negative_mix": MIX3,
        }
        out["targets"] = {"gets_per_sample": 0.05, "bytes_per_sample_over_clip": 1.10}
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def predict_block_reads(idx: DatasetIndex, cfg: DataConfig, split: str = "train") -> dict:
    """The formula of docs/data-loading.md, from the index alone: per epoch one GET per block
    (a split's run of a shard, cut every ``block_mb``; gaps up to ``block_read_through_mb`` read
    through) plus one per stream boundary that cuts a block; the bytes of those runs per sample."""
    rows = idx.rows(split)
    j = idx.members.index("mp4")
    start, end, shard = (
        idx.offset[rows, j],
        idx.offset[rows, j] + idx.size[rows, j],
        idx.shard[rows],
    )
    gap, block = cfg.block_read_through_mb * 2**20, cfg.block_mb * 2**20
    num_blocks, span = 0, 0.0
    for s in np.unique(shard):
        lo, hi = np.sort(start[shard == s]), np.sort(end[shard == s])
        # Runs of the split in this shard: a gap above the read-through starts a new one.
        cuts = np.flatnonzero(lo[1:] - hi[:-1] > gap) + 1
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(lo)], strict=True):
            run = float(hi[b - 1] - lo[a])
            num_blocks += int(np.ceil(run / block))
            span += run
    streams = auto_streams(cfg.global_batch_size, cfg.block_streams)
    samples = len(rows) // cfg.global_batch_size * cfg.global_batch_size
    mean_clip = float(idx.size[rows, j].mean())
    return {
        "blocks_per_epoch": num_blocks,
        "streams": streams,
        "gets_per_sample": (num_blocks + streams - 1) / samples,
        "bytes_per_sample_over_clip": span / len(rows) / mean_clip,
    }


def epoch_reads(cfg: DataConfig, world_size: int, proxy) -> dict:
    """GETs and shard bytes per epoch the proxy saw over a whole run of ``cfg.epochs`` epochs,
    every rank, less each rank's start-up (index, listing, probe: before its first batch). The
    next epoch's first windows are prefetched during the current one, and not after the last,
    so the run's reads are exactly its epochs' and their mean is the steady state."""
    gets = ranged = samples = startup_gets = 0
    counts: dict[str, int] = {}  # the loaders' own counters, start-up included
    for rank in range(world_size):
        g0 = proxy.gets
        loader = build_loader(cfg, rank=rank, world_size=world_size)
        g1, b1 = proxy.gets, proxy.ranged_bytes
        for batch in loader:
            samples += len(batch["key"])
        loader.close()
        tel = loader.telemetry()
        for name in ("requests", "retries", "outside_block_reads", "block_fallback_reads"):
            counts[name] = counts.get(name, 0) + tel[name]
        startup_gets += g1 - g0
        gets, ranged = gets + proxy.gets - g1, ranged + proxy.ranged_bytes - b1
    return {
        "epochs": cfg.epochs,
        "samples_per_epoch": samples / cfg.epochs,
        "gets_per_epoch": gets / cfg.epochs,
        "ranged_bytes_per_epoch": ranged / cfg.epochs,
        "startup_gets": startup_gets,
        **counts,
    }


def split_layout(work: Path, quick: bool) -> dict:
    """Issue 22's set-up: ``avts synth`` 960 clips (its defaults), 240 per shard, validation and
    test fractions 0 (the labelled pool is the other split), global batch 6, world size 2, moto
    S3, three epochs (reads per epoch in steady state); measured against the formula."""
    corpus = dict(num_videos=240 if quick else 960, seconds=4.0, fps=8.0, size=32)
    corpus |= dict(sample_rate=16000, num_classes=4, shard_size=60 if quick else 240, seed=0)
    corpus |= dict(val_fraction=0.0, test_fraction=0.0)
    corpus |= dict(eval_train_fraction=0.15, eval_test_fraction=0.15)
    local = str(work / "layout")
    synthesize(local, num_workers=2, **corpus)
    idx = DatasetIndex.load(local)
    proc, endpoint = start_moto()
    try:
        import s3fs

        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
        fs.mkdir("layout")
        fs.put(local, "layout/ds", recursive=True)
        proxy = FaultyS3Proxy(endpoint, fail_every=0).start()
        cfg = DataConfig(
            url="s3://layout/ds",
            storage_options={"client_kwargs": {"endpoint_url": proxy.endpoint}},
            access="block", global_batch_size=6, num_workers=1, epochs=3, seed=0,
        )  # fmt: skip
        try:
            run = epoch_reads(cfg, 2, proxy)
        finally:
            proxy.stop()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    rows = idx.rows("train")
    mean_clip = float(idx.size[rows, idx.members.index("mp4")].mean())
    measured = {
        **run,
        "gets_per_sample": run["gets_per_epoch"] / run["samples_per_epoch"],
        "bytes_per_sample_over_clip": run["ranged_bytes_per_epoch"]
        / run["samples_per_epoch"]
        / mean_clip,
    }
    predicted = predict_block_reads(idx, cfg)
    return {
        "corpus": corpus,
        "train_clips": len(rows),
        "mean_clip_bytes": mean_clip,
        "config": {"global_batch_size": 6, "world_size": 2, "epochs": 3,
                   "block_mb": cfg.block_mb, "block_read_through_mb": cfg.block_read_through_mb},
        "measured": measured,
        "predicted": predicted,
        "predicted_over_measured_gets": predicted["gets_per_sample"] / measured["gets_per_sample"],
        "targets": {"gets_per_sample": 0.03, "bytes_per_sample_over_clip": 1.10},
    }  # fmt: skip


# ---- shuffle quality (samplers only) ----


def toy_index(num_shards: int, per_shard: int, clip_mb: float, seed: int = 0):
    """Shard, byte start and end of every clip; row ids in shard order."""
    rng = np.random.default_rng(seed)
    n = num_shards * per_shard
    size = (rng.uniform(0.7, 1.3, n) * clip_mb * 2**20).astype(np.int64)
    shard = np.repeat(np.arange(num_shards), per_shard)
    start = np.zeros(n, dtype=np.int64)
    for s in range(num_shards):
        rows = slice(s * per_shard, (s + 1) * per_shard)
        start[rows] = np.cumsum(size[rows] + 1536) - size[rows]
    return shard, start, start + size


def default_blocks(shard, start, end, batch: int, streams: int) -> BlockSampler:
    """The block order with the default block_mb (32) and shuffle_window_blocks (2)."""
    return BlockSampler(
        np.arange(len(shard)),
        batch,
        0,
        shard=shard,
        start=start,
        end=end,
        block_bytes=32 * 2**20,
        window_blocks=2,
        num_streams=streams,
    )


def webdataset_order(shard: np.ndarray, consumers: int, batch: int, buffer: int, seed: int):
    """Batches as a webdataset pipeline makes them: shards shuffled and dealt to consumers
    (rank x worker), each streams its shards through a ``buffer``-sample shuffle buffer and
    emits whole batches; consumers take turns."""
    rng = np.random.default_rng(seed)
    shards = rng.permutation(int(shard.max()) + 1)
    streams = []
    for c in range(consumers):
        rows = np.concatenate([np.flatnonzero(shard == s) for s in shards[c::consumers]])
        buf: list[int] = []
        out: list[int] = []
        for r in rows:
            if len(buf) < buffer:
                buf.append(int(r))
                continue
            k = int(rng.integers(len(buf)))
            out.append(buf[k])
            buf[k] = int(r)
        rng.shuffle(buf)
        out.extend(buf)
        streams.append(out[: len(out) // batch * batch])
    batches = []
    for i in range(max(len(s) for s in streams) // batch):
        for s in streams:
            if (i + 1) * batch <= len(s):
                batches.append(s[i * batch : (i + 1) * batch])
    return np.asarray(batches).reshape(-1)


def shuffle_stats(order: np.ndarray, shard: np.ndarray, batch: int) -> dict:
    visit = np.arange(len(order))
    dataset_rank = np.argsort(np.argsort(order))  # rows are in dataset order
    spearman = float(np.corrcoef(dataset_rank, visit)[0, 1])
    same = []
    for b in order[: len(order) // batch * batch].reshape(-1, batch):
        _, counts = np.unique(shard[b], return_counts=True)
        same.append((counts * (counts - 1)).sum() / (batch * (batch - 1)))
    return {"spearman": spearman, "same_shard_pair_share": float(np.mean(same))}


def shuffle_quality(quick: bool) -> dict:
    num_shards, per_shard, batch = (40, 500, 256) if quick else (100, 1000, 256)
    shard, start, end = toy_index(num_shards, per_shard, clip_mb=0.3)
    pool = np.arange(len(shard))
    block = default_blocks(shard, start, end, batch, auto_streams(batch))
    random_order = GlobalSampler(pool, batch, 0).order(0)
    wds = webdataset_order(shard, consumers=16, batch=batch, buffer=1000, seed=0)
    return {
        "index": {"clips": len(shard), "shards": num_shards, "clip_mb": 0.3},
        "global_batch_size": batch,
        "block": {
            "block_mb": 32,
            "shuffle_window_blocks": 2,
            "block_streams": block.num_streams,
            **shuffle_stats(block.order(0), shard, batch),
        },
        "full_random": shuffle_stats(random_order, shard, batch),
        "webdataset_buffer_1000": {
            "consumers": 16,
            **shuffle_stats(wds, shard, batch),
        },
        "independent_baseline_same_shard": 1.0 / num_shards,
    }


# ---- memory over 10,000 samples ----


def rss_trace(work: Path, quick: bool) -> dict:
    small = str(work / "small")
    synthesize(
        small,
        num_videos=48,
        seconds=3.0,
        fps=8.0,
        size=32,
        sample_rate=16000,
        num_classes=4,
        shard_size=12,
        seed=2,
        val_fraction=0.0,
    )
    cfg = DataConfig(
        url=small,
        access="block",
        block_mb=0.1,
        shuffle_window_blocks=2,
        global_batch_size=8,
        num_workers=2,
        size=32,
        epochs=0,
        **SAMPLE,
    )
    total = 2000 if quick else 10_000
    loader = build_loader(cfg)
    it = iter(loader)
    seen, trace = 0, []
    t0 = time.perf_counter()
    while seen < total:
        batch = next(it)
        seen += len(batch["key"])
        del batch
        if seen % 1000 == 0:
            me = psutil.Process()
            procs = {"main": me} | {
                f"worker{i}": p for i, p in enumerate(me.children(recursive=False))
            }
            row: dict = {"samples": seen}
            for name, p in procs.items():
                with contextlib.suppress(psutil.NoSuchProcess):
                    row[f"{name}_rss_mb"] = round(p.memory_info().rss / 2**20, 1)
            row["block_cache_mb"] = round(loader.telemetry()["block_cache_mb"], 3)
            trace.append(row)
    tel = loader.telemetry()
    loader.close()
    first, last = trace[0], trace[-1]
    growth = {k: round(last[k] - first[k], 1) for k in last if k.endswith("rss_mb") and k in first}
    return {
        "samples": seen,
        "seconds": time.perf_counter() - t0,
        "trace": trace,
        "rss_growth_mb_first_to_last": growth,
        "block_cache_peak_mb": tel["block_cache_peak_mb"],
        "block_cache_bound_mb": tel["block_cache_bound_mb"],
        "config": {"block_mb": 0.1, "shuffle_window_blocks": 2, "num_workers": 2, "batch": 8},
    }


# ---- the layout at AudioSet scale ----


def at_scale(quick: bool) -> dict:
    clips = 200_000 if quick else 2_000_000
    per_shard = 3400  # about 1 GiB shards of 0.3 MB clips
    shard, start, end = toy_index(clips // per_shard, per_shard, clip_mb=0.3)
    clips = len(shard)
    batch = 2048
    clip_bytes = float((end - start).mean())
    out = {
        "assumptions": {
            "clips": clips,
            "clip_mb_mean": 0.3,
            "clip_mb_spread": "uniform 0.7x-1.3x",
            "clips_per_shard": per_shard,
            "global_batch_size": batch,
            "block_mb": 32,
            "shuffle_window_blocks": 2,
            "note": "0.3 MB is the assumed size of a 10 s training-profile clip (128 px short "
            "side, 1 s GOP, AAC mono); requests exclude the index and listings (a few per run)",
        },
        "runs": [],
    }
    for streams in (auto_streams(batch), batch):
        t0 = time.perf_counter()
        sampler = default_blocks(shard, start, end, batch, streams)
        eb = sampler.blocks(0)
        layout_s = time.perf_counter() - t0
        piece_streams = (
            eb.window_lo[
                np.searchsorted(eb.window_first_piece, np.arange(len(eb.piece_start)), side="right")
                - 1
            ]
            // sampler.stream_len
        )
        piece_bytes = eb.piece_end - eb.piece_start
        used = sampler.num_positions
        for ranks in (8, 64, 512):
            # Each rank reads the pieces of every stream it holds a share of.
            readers = np.zeros(streams, dtype=np.int64)
            for r in range(ranks):
                readers[sampler.streams_of(r, ranks).start : sampler.streams_of(r, ranks).stop] += 1
            gets = float(readers[piece_streams].sum())
            out["runs"].append(
                {
                    "block_streams": streams,
                    "ranks": ranks,
                    "gets_per_sample": gets / used,
                    "bytes_per_sample_over_clip": float(
                        (readers[piece_streams] * piece_bytes).sum() / used / clip_bytes
                    ),
                    "cache_bound_mb_per_rank": len(sampler.streams_of(0, ranks))
                    * 3
                    * 2
                    * sampler.max_block_bytes
                    / 2**20,
                    "layout_seconds_per_epoch": layout_s,
                }
            )
            print("scale", json.dumps(out["runs"][-1]), flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="smaller corpora (a smoke run)")
    ap.add_argument(
        "--only",
        nargs="*",
        choices=["requests", "shuffle", "rss", "at_scale", "split_layout"],
        default=None,
    )
    args = ap.parse_args()
    parts = args.only or ["requests", "shuffle", "rss", "at_scale", "split_layout"]
    work = Path(tempfile.mkdtemp(prefix="bench-blocks-"))
    result: dict = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "torch": torch.__version__,
    }
    if "shuffle" in parts:
        result["shuffle"] = shuffle_quality(args.quick)
        print("shuffle", json.dumps(result["shuffle"]), flush=True)
    if "at_scale" in parts:
        result["at_scale"] = at_scale(args.quick)
    if "requests" in parts:
        result["requests"] = requests_per_sample(work, args.quick)
    if "split_layout" in parts:
        result["split_layout"] = split_layout(work, args.quick)
        print("split_layout", json.dumps(result["split_layout"]), flush=True)
    if "rss" in parts:
        result["rss"] = rss_trace(work, args.quick)
        print("rss", json.dumps(result["rss"]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
