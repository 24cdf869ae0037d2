"""`avts train --nproc 2` with its ranks exec'd (fresh interpreters) or forked from the launcher
(``AVTS_RANK_START``), side by side on the same short run.

    python -m tests.benchmarks.bench_rank_start --out bench-results/rank_start.json [--reps 3]

The run: the quickstart model on a small synthetic corpus (24 clips, tests/fixtures/corpus.py's
TRAIN_CORPUS), global batch 4, 8 steps, validation at 4 and 8, checkpoints every 2: the config
of the test suite's 2-rank runs (tests/integration/test_train.py ``_config``). Each rep runs both
start methods, alternating which goes first; per run the CPU-seconds of the launcher and every
rank (``RUSAGE_CHILDREN`` of this process: the launcher reaps its ranks either way), the wall
time, and the losses of metrics.jsonl, which must be the same bitwise both ways. Medians reported, and the ratio fork / exec.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
METHODS = ("exec", "fork")


def _one(work: Path, config: Path, method: str, name: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", AVTS_RANK_START=method)
    cmd = [sys.executable, "-m", "avts_dist", "train", "--config", str(config), "--nproc", "2"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    proc = subprocess.run([*cmd, f"run.name={name}"], cwd=work, env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{method} run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = (work / "runs" / name / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"cpu_s": round(cpu, 2), "wall_s": round(wall, 2), "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-results/rank_start.json")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from avts_dist.data.synthetic import synthesize
    from tests.fixtures.corpus import TRAIN_CORPUS
    from tests.integration.test_train import _config  # the suite's 2-rank runs, as they are

    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    with tempfile.TemporaryDirectory(prefix="avts-bench-rank-start-") as tmp:
        work = Path(tmp)
        synthesize(str(work / "ds"), **TRAIN_CORPUS)
        config = _config(work, str(work / "ds"))
        for rep in range(args.reps):
            order = METHODS if rep % 2 == 0 else METHODS[::-1]
            for method in order:
                runs[method].append(_one(work, config, method, f"{method}{rep}"))
    same = all(r["losses"] == runs["exec"][0]["losses"] for m in METHODS for r in runs[m])
    result: dict = {"reps": args.reps, "cores": os.cpu_count(), "same_losses_bitwise": same}
    for method, vals in runs.items():
        result[method] = {
            "cpu_s_median": statistics.median(v["cpu_s"] for v in vals),
            "wall_s_median": statistics.median(v["wall_s"] for v in vals),
            "cpu_s": [v["cpu_s"] for v in vals],
            "wall_s": [v["wall_s"] for v in vals],
        }
    result["fork_over_exec_cpu"] = round(
        result["fork"]["cpu_s_median"] / result["exec"]["cpu_s_median"], 3
    )
    result["fork_over_exec_wall"] = round(
        result["fork"]["wall_s_median"] / result["exec"]["wall_s_median"], 3
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}))
    print({m: (result[m]["cpu_s_median"], result[m]["wall_s_median"]) for m in METHODS})
    if not same:
        raise SystemExit("the losses differ between the start methods")


if __name__ == "__main__":
    main()
