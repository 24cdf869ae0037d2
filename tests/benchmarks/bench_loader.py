"""Loader benchmark: throughput against the decode-only limit, S3 against local disk, bytes per
sample, worker scaling and memory over thousands of clips. Writes one JSON file.

    .venv/bin/python tests/benchmarks/bench_loader.py --out bench_loader.json [--quick]
        [--access block|random]

Both sides of every ratio use the same ``data.access`` (default ``block``, the default for S3).

- (a) ``loader_vs_decode``: clips/s of the loader with one worker against the decode-only limit:
  the same samples (same plans: clips, windows, negatives, crops) decoded in a tight loop in this
  process from bytes already in memory (decord video + PyAV audio + log-mel, exactly the
  loader's per-sample work). Target >= 0.9.
- (b) ``s3_vs_local``: the loader reading from a moto S3 server on loopback against local disk,
  one worker each. Target >= 0.95 (issue 10).
- (c) ``bytes_per_sample``: bytes read per sample against the mean clip (mp4 member) size, for
  hard negatives (same clip) and easy negatives (another clip: a second read with random
  access, a clip already in memory with block access).
- (d) ``workers_1_to_2``: clips/s with two workers against one.
- (e) ``rss``: resident memory of the loader's processes (main + workers) after 500 and after
  5,000 clips of a small corpus repeated (infinite mode).

All ratios are measured side by side in one run, so machine load affects both sides alike.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
# Run as a script from anywhere: the repository root holds the tests package (moto helpers).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

from avts_dist.config import DataConfig  # noqa: E402
from avts_dist.data import DatasetIndex, build_loader  # noqa: E402
from avts_dist.data.synthetic import synthesize  # noqa: E402

torch.set_num_threads(1)


def loader_rate(cfg: DataConfig, num_steps: int, warmup: int = 2) -> dict:
    """Clips/s of the loader over ``num_steps`` steps after ``warmup`` (worker start-up)."""
    loader = build_loader(cfg)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    cpu0 = loader_cpu_s()
    tel0 = loader.telemetry()
    plans = []
    for _ in range(num_steps):
        batch = next(it)
        plans.extend(zip(batch["epoch"].tolist(), batch["position"].tolist(), strict=True))
    elapsed = time.perf_counter() - t0
    cpu = loader_cpu_s() - cpu0
    tel = loader.telemetry()
    loader.close()
    clips = tel["clips"] - tel0["clips"]
    return {
        "clips": clips,
        "seconds": elapsed,
        "clips_per_s": clips / elapsed,
        "cpu_s_per_clip": cpu / clips,
        "bytes_read": tel["bytes_read"] - tel0["bytes_read"],
        "wait_s": tel["wait_s"] - tel0["wait_s"],
        "samples": plans,
        "loader": loader,
    }


# Processes that are not the loader's (the moto server) are left out of its CPU time.
_NOT_LOADER: set[int] = set()


def loader_cpu_s() -> float:
    """User + system CPU seconds of this process and its live children (the workers).

    CPU time per clip is what the loader costs, almost untouched by other load on a shared
    machine, where wall-clock rates swing by 2x from one minute to the next."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        if child.pid in _NOT_LOADER:
            continue
        with contextlib.suppress(psutil.NoSuchProcess):
            total += sum(child.cpu_times()[:2])
    return total


def decode_only_rate(loader, samples: list[tuple[int, int]]) -> dict:
    """The same samples' decoding from bytes in memory, in a tight loop in this process."""
    ds = loader.dataset
    rows = loader.sampler
    mix = {k: v for k, v in loader.negative_mix.items()}
    prepared = []
    for epoch, pos in samples:
        plan = ds._plan(epoch, pos, rows.row_at(epoch, pos), mix, 0)
        pos_bytes = ds.reader.read(plan.row)
        neg_bytes = ds.reader.read(plan.neg_row) if plan.neg_row != plan.row else None
        prepared.append((plan, pos_bytes, neg_bytes))
    ds._decode(*prepared[0])  # warm-up (filterbank cache, first decord use)
    t0 = time.perf_counter()
    c0 = time.process_time()
    for item in prepared:
        ds._decode(*item)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    # decord alone (video frames only), for reference.
    import io

    import decord

    t1 = time.perf_counter()
    for _plan, pos_bytes, _ in prepared:
        vr = decord.VideoReader(io.BytesIO(pos_bytes), num_threads=1)
        vr.get_batch(list(range(0, min(len(vr), 8)))).asnumpy()
        del vr
    decord_elapsed = time.perf_counter() - t1
    return {
        "clips": len(prepared),
        "clips_per_s": len(prepared) / elapsed,
        "cpu_s_per_clip": cpu / len(prepared),
        "decord_video_only_clips_per_s": len(prepared) / decord_elapsed,
    }


def process_rss_mb() -> float:
    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total / 2**20


def rss_growth(url: str, num_clips_small: int, num_clips_large: int, access: str) -> dict:
    cfg = DataConfig(
        url=url,
        access=access,
        global_batch_size=10,
        num_workers=1,
        num_frames=8,
        fps=8.0,
        size=32,
        negative_mix={"easy": 1.0, "hard": 1.0, "superhard": 1.0},
        epochs=0,
    )
    loader = build_loader(cfg)
    it = iter(loader)
    out, seen = {}, 0
    marks = {num_clips_small, num_clips_large}
    samples = []
    t0 = time.perf_counter()
    while seen < num_clips_large:
        batch = next(it)
        seen += len(batch["key"])
        del batch
        if seen in marks or (seen % 500 == 0):
            samples.append((seen, round(process_rss_mb(), 1)))
        if seen in marks:
            out[f"rss_mb_after_{seen}"] = process_rss_mb()
    loader.close()
    out["ratio_large_over_small"] = (
        out[f"rss_mb_after_{num_clips_large}"] / out[f"rss_mb_after_{num_clips_small}"]
    )
    out["trace_clips_rss_mb"] = samples
    out["seconds"] = time.perf_counter() - t0
    return out


def start_moto() -> tuple[subprocess.Popen, str]:
    from tests.fixtures.s3 import free_port, wait_http

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    wait_http(f"{endpoint}/moto-api/")
    return proc, endpoint


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="fewer clips (a smoke run)")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--access", choices=["block", "random"], default="block")
    args = ap.parse_args()
    steps = 8 if args.quick else 25
    work = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    result: dict = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "torch": torch.__version__,
        "access": args.access,
    }
    # A corpus closer to real clips than the test corpus: 112 px, 24 fps source, 6 s.
    # 192 clips in 3 shards: enough for block access to read runs of clips (a piece per stream
    # per shard), as it does at scale, rather than one or two clips per request.
    corpus = dict(num_videos=192, seconds=6.0, fps=24.0, size=112, sample_rate=16000)
    corpus |= dict(num_classes=4, shard_size=64, seed=0)
    t0 = time.perf_counter()
    local = str(work / "ds")
    synthesize(local, val_fraction=0.0, num_workers=2, **corpus)
    result["corpus"] = {**corpus, "synth_seconds": time.perf_counter() - t0}
    idx = DatasetIndex.load(local)
    mean_clip_bytes = float(np.mean([idx.member(r, "mp4")[2] for r in idx.rows("train")]))
    base = dict(
        url=local,
        global_batch_size=8,
        num_workers=1,
        num_frames=8,
        fps=8.0,
        size=112,
        negative_mix={"easy": 1.0, "hard": 1.0, "superhard": 1.0},
        epochs=0,
        seed=1,
        access=args.access,
    )

    reps = 2 if args.quick else 3
    result["method"] = (
        f"each ratio is measured {reps} times, the two sides alternating; reported: the best "
        "rate of each side (least disturbed by other load) and the median of the paired ratios"
    )

    # (a) loader, one worker, against the decode-only limit on the same samples.
    pairs = []
    for _ in range(reps):
        run1 = loader_rate(DataConfig(**base), steps)
        limit = decode_only_rate(run1["loader"], run1["samples"])
        pairs.append((run1, limit))
    best_loader = max(r["clips_per_s"] for r, _ in pairs)
    best_limit = max(lim["clips_per_s"] for _, lim in pairs)
    result["a_loader_vs_decode"] = {
        "loader_clips_per_s": best_loader,
        "decode_only_clips_per_s": best_limit,
        "decord_video_only_clips_per_s": max(
            lim["decord_video_only_clips_per_s"] for _, lim in pairs
        ),
        "ratio": best_loader / best_limit,
        "median_paired_ratio": float(
            np.median([r["clips_per_s"] / lim["clips_per_s"] for r, lim in pairs])
        ),
        "paired": [[r["clips_per_s"], lim["clips_per_s"]] for r, lim in pairs],
        "target": 0.9,
        # Throughput ratio on an otherwise idle core: decode-only CPU/clip over loader CPU/clip
        # (loader = main process + worker, reads and IPC included).
        "cpu_ratio": float(
            np.median([lim["cpu_s_per_clip"] / r["cpu_s_per_clip"] for r, lim in pairs])
        ),
        "loader_cpu_ms_per_clip": 1000 * min(r["cpu_s_per_clip"] for r, _ in pairs),
        "decode_only_cpu_ms_per_clip": 1000 * min(lim["cpu_s_per_clip"] for _, lim in pairs),
        "clips_per_run": pairs[0][0]["clips"],
    }
    print("a", json.dumps(result["a_loader_vs_decode"]), flush=True)

    # (d) two workers against one.
    pairs = []
    for _ in range(reps):
        one = loader_rate(DataConfig(**base), steps)["clips_per_s"]
        two = loader_rate(DataConfig(**{**base, "num_workers": 2}), steps)["clips_per_s"]
        pairs.append((one, two))
    result["d_workers_1_to_2"] = {
        "clips_per_s_1": max(p[0] for p in pairs),
        "clips_per_s_2": max(p[1] for p in pairs),
        "speedup": max(p[1] for p in pairs) / max(p[0] for p in pairs),
        "median_paired_speedup": float(np.median([b / a for a, b in pairs])),
        "paired": pairs,
        "note": f"{os.cpu_count()} CPU cores on this machine, shared with other work",
    }
    print("d", json.dumps(result["d_workers_1_to_2"]), flush=True)

    # (c) bytes read per sample against the clip size, over one whole epoch (block access
    # reads whole windows ahead: a few steps would say nothing).
    def epoch_bytes(mix: dict) -> float:
        loader = build_loader(DataConfig(**{**base, "negative_mix": mix, "epochs": 1}))
        for _ in loader:
            pass
        loader.close()
        tel = loader.telemetry()
        return tel["bytes_read"] / tel["clips"]

    per_sample = {kind: epoch_bytes({kind: 1.0}) for kind in ("hard", "easy")}
    per_sample["mix_1_1_1"] = epoch_bytes(base["negative_mix"])
    result["c_bytes_per_sample"] = {
        "mean_clip_bytes": mean_clip_bytes,
        "bytes_per_sample": per_sample,
        "ratio_to_clip": {k: v / mean_clip_bytes for k, v in per_sample.items()},
        "note": "one epoch, probe read at build included; random access: easy negatives read a "
        "second clip; block access: the clips of the window are in memory; hard and superhard "
        "reuse the positive's bytes",
    }
    print("c", json.dumps(result["c_bytes_per_sample"]), flush=True)

    # (b) S3 (moto on loopback) against local disk, one worker each, alternating.
    proc, endpoint = start_moto()
    _NOT_LOADER.add(proc.pid)
    try:
        import s3fs

        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
        fs.mkdir("bench")
        fs.put(local, "bench/ds", recursive=True)
        pairs, cpu_pairs = [], []
        for _ in range(reps):
            s3_rate = loader_rate(DataConfig(**{**base, "url": "s3://bench/ds"}), steps)
            local_rate = loader_rate(DataConfig(**base), steps)
            pairs.append((s3_rate["clips_per_s"], local_rate["clips_per_s"]))
            cpu_pairs.append((s3_rate["cpu_s_per_clip"], local_rate["cpu_s_per_clip"]))
        result["b_s3_vs_local"] = {
            "s3_clips_per_s": max(p[0] for p in pairs),
            "local_clips_per_s": max(p[1] for p in pairs),
            "ratio": max(p[0] for p in pairs) / max(p[1] for p in pairs),
            "median_paired_ratio": float(np.median([a / b for a, b in pairs])),
            "paired": pairs,
            "target": 0.95,
            # Client-side CPU per clip, local over S3 (the moto server's own CPU left out).
            "cpu_ratio": float(np.median([loc / s3 for s3, loc in cpu_pairs])),
            "note": "moto is a Python server on the same 2 shared cores: it takes CPU from "
            "decoding, which a real object store does not",
        }
        print("b", json.dumps(result["b_s3_vs_local"]), flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=10)

    # (e) memory over thousands of clips: a small corpus, repeated.
    if not args.skip_rss:
        small = str(work / "small")
        synthesize(
            small,
            num_videos=12,
            seconds=3.0,
            fps=8.0,
            size=32,
            sample_rate=16000,
            num_classes=4,
            shard_size=6,
            seed=2,
            val_fraction=0.0,
        )
        n_small, n_large = (100, 1000) if args.quick else (500, 5000)
        result["e_rss"] = rss_growth(small, n_small, n_large, args.access)
        print("e", json.dumps(result["e_rss"]), flush=True)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
