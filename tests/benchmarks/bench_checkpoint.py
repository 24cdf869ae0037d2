"""What the checkpoint checksums cost: a save that hashes its bytes on their way to the disk
(``avts_dist.integrity.save_torch``) against a plain ``torch.save``, and the verification a load
does first (read every byte back, sha256) against the save and against ``torch.load``.

    python tests/benchmarks/bench_checkpoint.py --out bench-results/checkpoint.json \\
        [--sizes-mib 16 128] [--repeats 5] [--dir /tmp]

State dicts of fp32 tensors of 1 MiB each, the shape of a model or optimizer shard. The
variants run interleaved, ``repeats`` times each, in one process; the figures are medians and
ratios measured side by side (the machine may be shared: absolute times vary, ratios less).
Every save ends with an fsync, as a checkpoint's does not (the page cache absorbs it): the
ratios are then conservative for the hashing overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from avts_dist.integrity import file_record, save_torch


def state_of(size_mib: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(size_mib)
    return {f"w{i}": torch.randn(256, 1024, generator=gen) for i in range(size_mib)}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def fsynced(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def measure(size_mib: int, repeats: int, folder: Path) -> dict:
    state = state_of(size_mib)
    path = folder / f"bench-{size_mib}.pt"
    times: dict[str, list[float]] = {k: [] for k in ("save", "save_hashed", "verify", "load")}
    for _ in range(repeats):
        times["save"].append(timed(lambda: (torch.save(state, path), fsynced(path))))
        times["save_hashed"].append(timed(lambda: (save_torch(state, path), fsynced(path))))
        record = save_torch(state, path)
        times["verify"].append(timed(lambda: file_record(path)))
        times["load"].append(timed(lambda: torch.load(path, weights_only=True)))
        assert file_record(path) == record  # the streamed digest is the file's
    path.unlink()
    med = {k: statistics.median(v) for k, v in times.items()}
    size = record.size
    return {
        "size_bytes": size,
        "median_s": med,
        "hash_overhead_on_save": med["save_hashed"] / med["save"] - 1.0,
        "verify_vs_save": med["verify"] / med["save"],
        "verify_vs_load": med["verify"] / med["load"],
        "sha256_mib_per_s": size / (1 << 20) / med["verify"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default="", help="folder on the disk to measure (default: tmp)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=args.dir or None) as tmp:
        results = {str(s): measure(s, args.repeats, Path(tmp)) for s in args.sizes_mib}
    report = {
        "benchmark": "checkpoint",
        "hash": "sha256 of the whole file, computed while torch.save writes it",
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "by_size_mib": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    for size, r in results.items():
        print(
            f"{size} MiB: save {r['median_s']['save']:.3f}s, hashed "
            f"{r['median_s']['save_hashed']:.3f}s (+{100 * r['hash_overhead_on_save']:.0f}%), "
            f"verify {r['median_s']['verify']:.3f}s ({r['verify_vs_save']:.2f}x save, "
            f"{r['verify_vs_load']:.2f}x load), sha256 {r['sha256_mib_per_s']:.0f} MiB/s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
