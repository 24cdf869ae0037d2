"""Index benchmark: an AudioSet-sized index (2M clips, no media) saved and loaded.

    .venv/bin/python tests/benchmarks/bench_index.py --num-clips 2000000 --out bench-results/index.json

Builds the columns a real 2M-clip dataset would have (AudioSet-style keys ``<YTID>_<start_ms>``,
1000 clips per shard, mp4+json members with cumulative tar offsets, 527 classes, 10 s clips),
commits them with the same code path as ``ShardWriter.close`` and loads them back with
``DatasetIndex.load`` in a fresh process, which reports:

- ``load_s``: wall time of ``DatasetIndex.load`` (read + inflate + validate);
- ``rss_delta_mb``: resident memory added by the load (``/proc/self/statm`` before and after);
- ``rows_s`` / ``touch_rss_delta_mb``: time and extra memory of ``rows(split="train")`` and of
  decoding the ``key``/``split``/``status`` views (built on first use);
- ``member_us``: mean cost of one ``idx.member(row, "mp4")`` lookup.
Nothing here asserts a speed; the figures go to the JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from avts_dist.data.index import (  # noqa: E402
    FORMAT_VERSION,
    INDEX_NAME,
    DatasetIndex,
    open_dataset_fs,
    shard_name,
)
from avts_dist.data.writer import _commit  # noqa: E402
from avts_dist.storage import join  # noqa: E402

CLIPS_PER_SHARD = 1000
NUM_CLASSES = 527


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build_index(num_clips: int, url: str, seed: int = 0) -> DatasetIndex:
    rng = np.random.default_rng(seed)
    alphabet = np.frombuffer(
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", np.uint8
    )
    ytid = alphabet[rng.integers(0, len(alphabet), size=(num_clips, 11))]
    start_ms = rng.integers(0, 300, size=num_clips) * 1000
    keys = np.char.add(np.char.add(ytid.view("S11").ravel(), b"_"), start_ms.astype("S6"))
    mp4_size = rng.integers(200_000, 1_500_000, size=num_clips)
    json_size = rng.integers(200, 400, size=num_clips)
    shard = (np.arange(num_clips) // CLIPS_PER_SHARD).astype(np.int32)
    # Each member: a 512-byte tar header, then its data padded to 512 bytes.
    padded = lambda n: (n + 511) // 512 * 512  # noqa: E731
    record = 512 + padded(mp4_size) + 512 + padded(json_size)
    first_of_shard = np.arange(num_clips) % CLIPS_PER_SHARD == 0
    ends = np.cumsum(record)
    shard_start = np.maximum.accumulate(np.where(first_of_shard, ends - record, 0))
    mp4_offset = ends - record - shard_start + 512
    json_offset = mp4_offset + padded(mp4_size) + 512
    status = np.zeros(num_clips, np.int8)
    status[rng.random(num_clips) < 0.01] = 1
    columns = {
        "key": keys,
        "shard": shard,
        "offset": np.stack([mp4_offset, json_offset], axis=1).astype(np.int64),
        "size": np.stack([mp4_size, json_size], axis=1).astype(np.int64),
        "label": rng.integers(0, NUM_CLASSES, size=num_clips).astype(np.int32),
        "split": (rng.random(num_clips) < 0.05).astype(np.int8),
        "duration": np.full(num_clips, 10.0, np.float32),
        "fps": np.full(num_clips, 25.0, np.float32),
        "num_frames": np.full(num_clips, 250, np.int32),
        "has_video": np.ones(num_clips, bool),
        "has_audio": status == 0,
        "sample_rate": np.full(num_clips, 48000, np.int32),
        "status": status,
    }
    header = {
        "format_version": FORMAT_VERSION,
        "classes": [f"/m/{i:05d}" for i in range(NUM_CLASSES)],
        "shards": [shard_name(i) for i in range(int(shard[-1]) + 1)],
        "splits": ["train", "val"],
        "statuses": ["ok", "no_audio"],
        "members": ["mp4", "json"],
        "num_clips": num_clips,
        "extra_columns": {},
        "metadata": {"generator": "bench_index"},
    }
    return DatasetIndex(columns, header, url)


def measure_load(url: str) -> dict:
    """Runs in a fresh process so that RSS deltas are the index's alone."""
    import gc

    gc.collect()
    before = rss_mb()
    start = time.perf_counter()
    idx = DatasetIndex.load(url)
    load_s = time.perf_counter() - start
    after_load = rss_mb()
    start = time.perf_counter()
    train_rows = idx.rows(split="train")
    rows_s = time.perf_counter() - start
    start = time.perf_counter()
    _ = idx.key, idx.split, idx.status
    decode_views_s = time.perf_counter() - start
    after_touch = rss_mb()
    probe = np.random.default_rng(1).integers(0, len(idx), size=10_000)
    start = time.perf_counter()
    for row in probe:
        idx.member(int(row), "mp4")
    member_us = (time.perf_counter() - start) / len(probe) * 1e6
    return {
        "num_rows": len(idx),
        "num_train_rows": int(train_rows.size),
        "load_s": round(load_s, 3),
        "rss_before_mb": round(before, 1),
        "rss_delta_mb": round(after_load - before, 1),
        "column_bytes_mb": round(sum(a.nbytes for a in idx._columns.values()) / 2**20, 1),
        "rows_s": round(rows_s, 4),
        "decode_views_s": round(decode_views_s, 3),
        "touch_rss_delta_mb": round(after_touch - after_load, 1),
        "member_us": round(member_us, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-clips", type=int, default=2_000_000)
    parser.add_argument("--out", required=True, help="JSON file for the figures")
    parser.add_argument(
        "--url", default=None, help="where to write the index (default: a temp dir)"
    )
    parser.add_argument("--load-only", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load_only:
        json.dump(measure_load(args.load_only), sys.stdout)
        return 0

    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        url = args.url or os.path.join(tmp, "ds")
        start = time.perf_counter()
        idx = build_index(args.num_clips, url)
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        data = idx.to_bytes()
        serialize_s = time.perf_counter() - start
        fs, root = open_dataset_fs(url)
        fs.makedirs(root, exist_ok=True)
        start = time.perf_counter()
        _commit(fs, join(root, INDEX_NAME), data)
        commit_s = time.perf_counter() - start
        del idx, data
        cmd = [sys.executable, os.path.abspath(__file__), "--out", "-", "--load-only", url]
        child = subprocess.run(cmd, capture_output=True, text=True, check=True)
        loaded = json.loads(child.stdout)
        result = {
            "benchmark": "index",
            "num_clips": args.num_clips,
            "clips_per_shard": CLIPS_PER_SHARD,
            "index_file_mb": round(fs.size(join(root, INDEX_NAME)) / 2**20, 1),
            "build_s": round(build_s, 3),
            "serialize_s": round(serialize_s, 3),
            "commit_s": round(commit_s, 3),
            **loaded,
            "url_protocol": fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0],
            "python": platform.python_version(),
            "numpy": np.__version__,
            "cpu_count": os.cpu_count(),
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
