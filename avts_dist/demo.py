"""The quickstart behind `make demo`: synthetic corpus -> inspect (-> pretraining -> evaluation ->
comparison, as those stages land). Every step is the `avts` command a user would type; the commands
are printed before they run."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path


def avts(*args: str) -> None:
    cmd = [sys.executable, "-m", "avts_dist", *args]
    print(f"\n$ avts {shlex.join(args)}", flush=True)
    start = time.monotonic()
    subprocess.run(cmd, check=True)
    print(f"  ({time.monotonic() - start:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo", help="folder for the corpus, runs and reports")
    args = parser.parse_args(argv)
    out = Path(args.out)
    corpus = out / "synth"
    avts(
        "synth", "--out", str(corpus), "--num-videos", "96", "--seconds", "4", "--fps", "8",
        "--size", "32", "--sample-rate", "16000", "--num-classes", "4", "--shard-size", "16",
        "--seed", "0", "--broken-fraction", "0.04",
    )  # fmt: skip
    avts("inspect", str(corpus))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as exc:
        print(f"demo: step failed with exit status {exc.returncode}", file=sys.stderr)
        sys.exit(exc.returncode)
