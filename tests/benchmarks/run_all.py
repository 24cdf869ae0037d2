"""Runs every benchmark script with its defaults and writes one JSON file each (`make bench`).

python -m tests.benchmarks.run_all --out bench-results [--only loader models]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = {
    "index": ["bench_index.py"],
    "decode": ["bench_decode.py"],
    "loader": ["bench_loader.py"],
    "blocks": ["bench_blocks.py"],
    "models": ["bench_models.py"],
    "loss": ["bench_loss.py"],
    "train": ["bench_train.py"],
    "checkpoint": ["bench_checkpoint.py"],
    "async_checkpoint": ["bench_async_checkpoint.py"],
    "video_ssl": ["bench_video_ssl.py"],
    # On the checked-in inputs; `sim_scale.py --decode-json bench-results/decode.json` takes
    # the decode figures of this run instead.
    "scale": ["sim_scale.py"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench-results", help="folder for the JSON files")
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), help="a subset")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in args.only or BENCHMARKS:
        script, *extra = BENCHMARKS[name]
        cmd = [sys.executable, str(HERE / script), "--out", str(out / f"{name}.json"), *extra]
        print(f"$ {' '.join(cmd)}", flush=True)
        start = time.monotonic()
        if subprocess.run(cmd).returncode != 0:
            failed.append(name)
        print(f"  {name}: {time.monotonic() - start:.0f} s", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
