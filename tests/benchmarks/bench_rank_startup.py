"""A rank's import cost, side by side: what each process of a run pays before its first step.

    python -m tests.benchmarks.bench_rank_startup --out bench-results/rank_startup.json [--reps 5]

Each set-up is a fresh interpreter (``sys.executable -c``), run ``--reps`` times, the set-ups
interleaved so machine load hits them alike; CPU-seconds (user + system, ``RUSAGE_CHILDREN``)
and peak resident set (``ru_maxrss`` of the child) per run, medians reported:

- ``torch``: ``import torch``, the floor every rank pays;
- ``deepspeed_plain``: ``import deepspeed`` as DeepSpeed does it, which imports mlflow through
  its autotuner (what every rank paid before ``import_deepspeed``, tracking or not);
- ``import_deepspeed``: ``avts_dist.extras.import_deepspeed()``, mlflow hidden while
  DeepSpeed imports (a rank that does not track);
- ``tracking_rank``: ``import mlflow`` then ``import_deepspeed()`` (a rank that tracks: rank 0,
  each other node's first rank).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
IMPORT_DS = "from avts_dist.extras import import_deepspeed; import_deepspeed()"
SETUPS = {
    "torch": "import torch",
    "deepspeed_plain": "import deepspeed",
    "import_deepspeed": IMPORT_DS,
    "tracking_rank": "import mlflow; " + IMPORT_DS,
}


def _one(code: str) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = {"PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin"}
    code = code + "; import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, int(out.stdout.split()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-results/rank_startup.json")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in SETUPS}
    for _ in range(args.reps):
        for name, code in SETUPS.items():
            runs[name].append(_one(code))
    result = {"reps": args.reps, "setups": {}}
    for name, vals in runs.items():
        result["setups"][name] = {
            "cpu_s_median": round(statistics.median(v[0] for v in vals), 2),
            "rss_mb_median": round(statistics.median(v[1] for v in vals), 1),
            "cpu_s": [round(v[0], 2) for v in vals],
        }
    s = result["setups"]
    result["saved_per_rank_cpu_s"] = round(
        s["deepspeed_plain"]["cpu_s_median"] - s["import_deepspeed"]["cpu_s_median"], 2
    )
    result["ratio_import_deepspeed_to_plain"] = round(
        s["import_deepspeed"]["cpu_s_median"] / s["deepspeed_plain"]["cpu_s_median"], 3
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
