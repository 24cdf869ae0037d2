"""The cost of one video_ssl step against one AVTS step (train.objective), side by side in one
run, one process, on the quickstart config.

    python -m tests.benchmarks.bench_video_ssl --out bench-results/video_ssl.json \
        [--config configs/pretrain/quickstart.yaml] [--corpus DIR] [--steps 20] [key=value ...]

Two real trainers (DeepSpeed engine + ``train_step``), one per objective, same config
otherwise. Measured:

1. compute: ``train_step`` on batches already in memory, blocks of 5 steps alternating between
   the objectives so machine load hits both alike (median step seconds, and the ratio);
2. data: the loader's seconds per global batch in this process (``data.num_workers=0``: decode
   cost, not hidden by workers), alternating batch by batch; and the decodes per sample from
   the loader's telemetry (video_ssl: two video windows, no audio; AVTS: one video window,
   the positive's audio and the negative's audio span).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run as a file (run_all.py) too

from tests.benchmarks.bench_train import (  # noqa: E402
    bench_corpus,
    parse_bench_args,
    write_result,
)

OBJECTIVES = ("avts", "video_ssl")


def main(argv: list[str] | None = None) -> dict:
    args = parse_bench_args(argv, __doc__, "timed steps per objective")

    from avts_dist.config import load_config
    from avts_dist.distributed import collectives as C
    from avts_dist.train.batch import to_device
    from avts_dist.train.trainer import Trainer

    work = Path(tempfile.mkdtemp(prefix="bench-video-ssl-"))
    corpus = bench_corpus(args.corpus, work)
    trainers = {}
    for objective in OBJECTIVES:
        cfg = load_config(
            args.config,
            [f"data.url={corpus}", f"run.dir={work / objective}", "tracking.enabled=false",
             "train.progress=false", "train.val_every_steps=0", "data.num_workers=0",
             *args.overrides, f"train.objective={objective}"],
        )  # fmt: skip
        ctx = C.init_distributed(cfg.deepspeed.backend)
        trainers[objective] = Trainer(cfg, ctx)

    # 2. data: batch by batch, alternating.
    iters = {o: iter(t.loader) for o, t in trainers.items()}
    load_s: dict[str, list[float]] = {o: [] for o in OBJECTIVES}
    batches: dict[str, list] = {o: [] for o in OBJECTIVES}
    for _ in range(args.steps):
        for objective, it in iters.items():
            t0 = time.perf_counter()
            batch = next(it)
            load_s[objective].append(time.perf_counter() - t0)
            if len(batches[objective]) < 4:
                batches[objective].append(to_device(batch, trainers[objective].device))
    for it in iters.values():
        it.close()
    data = {}
    for objective, trainer in trainers.items():
        tel = trainer.loader.telemetry()
        data[objective] = {
            "load_s_per_batch_median": statistics.median(load_s[objective]),
            "video_decodes_per_sample": tel["video_decodes"] / tel["clips"],
            "audio_decodes_per_sample": tel["audio_decodes_per_sample"],
            "decode_s_per_sample": tel["decode_s"] / tel["clips"],
            "clips": tel["clips"],
        }

    # 1. compute: blocks of 5 steps, alternating.
    step_s: dict[str, list[float]] = {o: [] for o in OBJECTIVES}

    def block(objective: str, n: int, record: bool) -> None:
        trainer = trainers[objective]
        for i in range(n):
            t0 = time.perf_counter()
            trainer.train_step(batches[objective][i % len(batches[objective])])
            if record:
                step_s[objective].append(time.perf_counter() - t0)

    for objective in OBJECTIVES:
        block(objective, 3, record=False)  # warm-up
    for _ in range(max(1, args.steps // 5)):
        for objective in OBJECTIVES:
            block(objective, 5, record=True)
    compute = {o: {"step_s_median": statistics.median(v)} for o, v in step_s.items()}
    cfg = trainers["avts"].cfg
    result = {
        "benchmark": "video_ssl",
        "config": args.config,
        "overrides": args.overrides,
        "global_batch_size": cfg.data.global_batch_size,
        "model_params": {
            o: sum(p.numel() for p in t.engine.module.parameters()) for o, t in trainers.items()
        },
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "num_steps_each": len(step_s["avts"]),
        "compute": compute,
        "compute_ratio_video_ssl_over_avts": compute["video_ssl"]["step_s_median"]
        / compute["avts"]["step_s_median"],
        "data": data,
        "data_ratio_video_ssl_over_avts": data["video_ssl"]["load_s_per_batch_median"]
        / data["avts"]["load_s_per_batch_median"],
    }
    for trainer in trainers.values():
        trainer.close()
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
