"""Gradient accumulation with the global batch's negatives: step time and peak memory, side by side.

    python -m tests.benchmarks.bench_accum --out bench-results/accum.json
        [--config configs/pretrain/quickstart.yaml] [--micro 8] [--k 4] [--steps 6] [key=value ...]

Four set-ups of the config's model, one process each (a fresh process gives a clean peak),
through DeepSpeed's engine and ``train.accumulation.accumulate_gradients``, on batches of random
media of the config's shape already in memory:

- ``k1``: one micro-batch of ``m`` rows per step (the memory the accumulation aims at);
- ``global``: k micro-batches of ``m`` rows, the loss over all ``k m`` (the embedding cache);
- ``micro``: k micro-batches of ``m`` rows, each with its own negatives (plain accumulation: the
  same work without the extra no-grad forward);
- ``big``: one batch of ``k m`` rows (what ``global`` reproduces, where memory allows).

Step time is the median over ``--steps`` steps after one warm-up step. Peak memory is
``torch.cuda.max_memory_allocated`` on a GPU; on CPU the process's peak resident set
(``ru_maxrss``) less its resident set before the first step, i.e. what the steps added.
Ratios are taken within one run of this script, so machine load hits every set-up alike.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
SETUPS = ("k1", "global", "micro", "big")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _batch(cfg, rows: int, device) -> dict[str, torch.Tensor]:
    d = cfg.data
    frames = int(d.clip_seconds * 1000 / d.mel_hop_ms) + 1
    gen = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (rows, 3, d.num_frames, d.size, d.size), generator=gen)
    audio = torch.randn(rows, 1, d.num_mel_bins, frames, generator=gen)
    from avts_dist.train.batch import to_device

    return to_device(
        {
            "video": video.to(torch.uint8),
            "audio": audio,
            "neg_audio": audio.roll(1, 0),
            "neg_kind": torch.zeros(rows, dtype=torch.long),
        },
        device,
    )


def run_setup(setup: str, config: str, micro: int, k: int, steps: int, overrides: list[str]):
    """One set-up in this process; returns its figures."""
    import dataclasses

    from avts_dist.config import load_config
    from avts_dist.distributed.engine import build_ds_config, initialize_engine, optimizer_step
    from avts_dist.losses import build_loss
    from avts_dist.models import build_model
    from avts_dist.train.accumulation import accumulate_gradients
    from avts_dist.train.batch import micro_batches

    cfg = load_config(config, overrides)
    num_parts = {"k1": 1, "big": 1}.get(setup, k)
    rows = micro if setup == "k1" else micro * k
    scope = "micro" if setup == "micro" else "global"
    ds = dataclasses.replace(cfg.deepspeed, grad_accum_steps=num_parts)
    ds_config = build_ds_config(
        ds, cfg.optim, global_batch_size=rows, world_size=1, total_steps=steps + 1
    )
    torch.manual_seed(0)
    engine = initialize_engine(build_model(cfg.model), ds_config, backend=cfg.deepspeed.backend)
    loss_fn = build_loss(cfg.loss)
    batch = _batch(cfg, rows, engine.device)
    cuda = engine.device.type == "cuda"
    base = _rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    times = []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        acc = accumulate_gradients(
            engine, loss_fn, micro_batches(batch, num_parts), objective="avts", rank=0,
            world_size=1, negatives_scope=scope, step=step,
        )  # fmt: skip
        optimizer_step(engine, skip=False)
        float(acc.losses[-1])  # waits for the device
        times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    engine.destroy()
    return {
        "setup": setup,
        "rows_per_step": rows,
        "micro_batch": rows // num_parts,
        "num_micro_batches": num_parts,
        "step_s": statistics.median(times[1:]),
        "peak_added_mb": peak - base,
        "device": str(engine.device),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench-results/accum.json")
    parser.add_argument("--config", default="configs/pretrain/quickstart.yaml")
    parser.add_argument("--micro", type=int, default=8, help="rows per micro-batch (m)")
    parser.add_argument("--k", type=int, default=4, help="micro-batches per step")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--setup", choices=SETUPS, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.setup:  # the child process of one set-up
        result = run_setup(args.setup, args.config, args.micro, args.k, args.steps, args.overrides)
        print(json.dumps(result))
        return result
    results = {}
    for setup in SETUPS:
        cmd = [sys.executable, "-m", "tests.benchmarks.bench_accum", "--setup", setup]
        cmd += ["--config", args.config, "--micro", str(args.micro), "--k", str(args.k)]
        cmd += ["--steps", str(args.steps), *args.overrides]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"set-up {setup} failed:\n{proc.stderr[-3000:]}")
        results[setup] = json.loads(proc.stdout.strip().splitlines()[-1])
    r = results
    report = {
        "config": args.config,
        "micro_batch": args.micro,
        "k": args.k,
        "setups": results,
        "ratios": {
            # The extra no-grad forward: global against plain accumulation of the same k x m.
            "time_global_over_micro": r["global"]["step_s"] / r["micro"]["step_s"],
            "time_global_over_big": r["global"]["step_s"] / r["big"]["step_s"],
            "time_global_over_k_times_k1": r["global"]["step_s"] / (args.k * r["k1"]["step_s"]),
            "memory_global_over_k1": r["global"]["peak_added_mb"] / r["k1"]["peak_added_mb"],
            "memory_global_over_big": r["global"]["peak_added_mb"] / r["big"]["peak_added_mb"],
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
