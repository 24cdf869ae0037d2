"""Training blocked per checkpoint save, synchronous against asynchronous upload
(``checkpoint.async_upload``), to the moto S3 server on this machine, side by side in one run.

    python -m tests.benchmarks.bench_async_checkpoint --out bench-results/async_checkpoint.json \\
        [--repeats 3] [--config configs/pretrain/audioset_r2plus1d18.yaml]

The model and optimizer are the config's (default R(2+1)D-18 + the audio VGG, AdamW under
ZeRO-1: fp32 weights, two moments and the fp32 master copy, about 0.58 GB), in a real DeepSpeed
engine of one process (gloo, CPU). One optimizer step on zero gradients gives the Adam states
their full size. Each repeat saves once synchronously (the step blocks for the staged write,
the upload and the confirmation) and once asynchronously (the step blocks for the staged write;
the upload is then awaited apart, and timed apart). The figures are medians; the ratio
``async_blocked / sync_blocked`` is the goal (<= 0.10, issue #22).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script (run_all.py): the tests package is needed
    sys.path.insert(0, str(REPO))


def _moto() -> tuple[subprocess.Popen, str]:
    from tests.benchmarks.bench_loader import start_moto
    from tests.fixtures.s3 import make_bucket

    proc, endpoint = start_moto()
    return proc, make_bucket(endpoint, "bench")


def _engine(config: str, work: Path):
    from avts_dist.config import load_config
    from avts_dist.distributed import collectives as C
    from avts_dist.distributed.engine import build_ds_config, initialize_engine
    from avts_dist.export.weights import build_initial_model

    cfg = load_config(
        config,
        [f"run.dir={work}", "data.url=/unused", "deepspeed.precision=fp32",
         "deepspeed.backend=gloo", "model.channels_last_3d=false"],
    )  # fmt: skip
    ctx = C.init_distributed(cfg.deepspeed.backend)
    ds_config = build_ds_config(
        cfg.deepspeed, cfg.optim, global_batch_size=cfg.data.global_batch_size, world_size=1,
        total_steps=100, load_universal=False, use_cuda=False,
    )  # fmt: skip
    engine = initialize_engine(build_initial_model(cfg.model), ds_config, backend=ctx.backend)
    # Zero gradients, one step: the Adam moments exist at their full size.
    engine.backward(sum((p * 0).sum() for p in engine.module.parameters()))
    engine.step()
    return cfg, engine


def _manager(cfg, work: Path, bucket: str, name: str, async_upload: bool):
    import dataclasses

    from avts_dist.train.checkpoint import CheckpointManager

    ck = dataclasses.replace(
        cfg.checkpoint, dir=f"s3://{bucket}/{name}", staging_dir=str(work / f"stage_{name}"),
        keep_last=1, async_upload=async_upload, storage_options={},
    )  # fmt: skip
    return CheckpointManager(ck, run_dir=work, rank=0, world_size=1)


class _Part:
    """A resumable part with nothing to say: the engine's state is what is measured."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--config", default=str(REPO / "configs/pretrain/audioset_r2plus1d18.yaml"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    moto, bucket = _moto()
    work = Path(tempfile.mkdtemp(prefix="bench-async-ckpt-"))
    try:
        cfg, engine = _engine(args.config, work)
        sync = _manager(cfg, work, bucket, "sync", False)
        background = _manager(cfg, work, bucket, "async", True)
        times: dict[str, list[float]] = {"sync_blocked": [], "async_blocked": [], "upload": []}
        from avts_dist.train.checkpoint import STATE_KEYS

        parts = {key: _Part() for key in STATE_KEYS}
        for step in range(1, args.repeats + 1):
            t0 = time.perf_counter()
            sync.save(engine, step, parts, {})
            times["sync_blocked"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            background.save(engine, step, parts, {})
            times["async_blocked"].append(time.perf_counter() - t0)
            t1 = time.perf_counter()
            assert background.finish(None)
            times["upload"].append(time.perf_counter() - t1)
            assert background.latest == sync.latest, (background.latest, sync.latest)
        stats = background.upload_stats
        med = {k: statistics.median(v) for k, v in times.items()}
        result = {
            "benchmark": "async_checkpoint",
            "config": args.config,
            "checkpoint_bytes": sync.last_save_bytes,
            "num_parameters": sum(p.numel() for p in engine.module.parameters()),
            "store": "moto S3 server on loopback",
            "repeats": args.repeats,
            "cpu_count": os.cpu_count(),
            "median_s": med,
            "all_s": times,
            "async_over_sync_blocked": med["async_blocked"] / med["sync_blocked"],
            "goal": "async_over_sync_blocked <= 0.10",
            "num_upload_retries": stats.num_retries,
        }
    finally:
        moto.terminate()
        moto.wait(timeout=10)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(
        f"{result['checkpoint_bytes'] / 1e9:.2f} GB: blocked sync {med['sync_blocked']:.2f}s, "
        f"async {med['async_blocked']:.2f}s ({100 * result['async_over_sync_blocked']:.1f}%), "
        f"upload in the background {med['upload']:.2f}s"
    )
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
