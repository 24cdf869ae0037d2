"""Training-system benchmark, one process, everything measured side by side in one run.

    python -m tests.benchmarks.bench_train --out bench-results/train.json [--corpus DIR]
        [--config configs/pretrain/quickstart.yaml] [--steps 20] [key=value ...]

1. Step time of the whole system (DeepSpeed engine + the trainer's ``train_step``: loss,
   finiteness agreement, clipping, scheduler) against a bare PyTorch loop (same model init,
   same loss, torch AdamW + clip_grad_norm_), both on the same batches already in memory.
   Blocks of steps alternate between the two so machine load hits both alike. Target <= 1.10x.
2. Data-wait fraction of the real loop at the config's settings (loader -> step).
3. Checkpoint save and load throughput against this disk's own write/read throughput
   (a file of the checkpoint's size, fsync'ed), in the same folder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def _bare_step(model, loss_fn, opt, batch, grad_clip: float) -> None:
    emb = model(batch["video"], batch["audio"], batch["neg_audio"])
    out = loss_fn(
        emb["video_emb"], emb["audio_emb"], emb.get("neg_audio_emb"), batch["neg_kind"],
        rank=0, world_size=1, sync_logit=emb.get("sync_logit"),
        neg_sync_logit=emb.get("neg_sync_logit"),
    )  # fmt: skip
    out["loss"].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _disk_throughput(folder: Path, num_bytes: int) -> dict[str, float]:
    path = folder / "disk_probe.bin"
    data = os.urandom(min(num_bytes, 64 << 20))
    reps = max(1, num_bytes // len(data))
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(reps):
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass
    read_s = time.perf_counter() - t0
    size = reps * len(data)
    path.unlink()
    return {"bytes": size, "write_MBps": size / write_s / 1e6, "read_MBps": size / read_s / 1e6}


def parse_bench_args(argv: list[str] | None, doc: str | None, steps_help: str):
    """The arguments of the trainer benchmarks (this one and bench_video_ssl.py); sets torch's
    thread count from OMP_NUM_THREADS."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--out", required=True)
    parser.add_argument("--config", default=str(REPO / "configs/pretrain/quickstart.yaml"))
    parser.add_argument("--corpus", default="", help="dataset URL (default: synthesize one)")
    parser.add_argument("--steps", type=int, default=20, help=steps_help)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    return args


def write_result(result: dict, out: str) -> dict:
    """``result`` as JSON to ``out`` (folders made) and to stdout."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


def bench_corpus(corpus: str, work: Path) -> str:
    """``corpus``, or a 48-video synthetic corpus written under ``work``."""
    if corpus:
        return corpus
    from avts_dist.data.synthetic import synthesize

    corpus = str(work / "synth")
    synthesize(corpus, num_videos=48, seconds=4.0, fps=8.0, size=32, sample_rate=16000,
               num_classes=4, shard_size=16, seed=0)  # fmt: skip
    return corpus


def main(argv: list[str] | None = None) -> dict:
    args = parse_bench_args(argv, __doc__, "timed steps per side")

    from avts_dist.config import load_config
    from avts_dist.distributed import collectives as C
    from avts_dist.losses import build_loss
    from avts_dist.models import build_model
    from avts_dist.train.batch import to_device
    from avts_dist.train.trainer import Trainer

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    corpus = bench_corpus(args.corpus, work)
    cfg = load_config(
        args.config,
        [f"data.url={corpus}", f"run.dir={work / 'run'}", "tracking.enabled=false",
         "train.progress=false", "train.val_every_steps=0", *args.overrides],
    )  # fmt: skip
    ctx = C.init_distributed(cfg.deepspeed.backend)
    trainer = Trainer(cfg, ctx)

    # Batches in memory (both sides use the very same tensors).
    it = iter(trainer.loader)
    num_batches = 4
    batches = [to_device(next(it), trainer.device) for _ in range(num_batches)]
    it.close()

    torch.manual_seed(cfg.data.seed)
    bare_model = build_model(cfg.model)
    bare_loss = build_loss(cfg.loss)
    bare_opt = torch.optim.AdamW(
        bare_model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
        weight_decay=cfg.optim.weight_decay,
    )  # fmt: skip

    def timed_block(fn, n: int) -> list[float]:
        out = []
        for i in range(n):
            t0 = time.perf_counter()
            fn(batches[i % num_batches])
            out.append(time.perf_counter() - t0)
        return out

    def system(b):
        trainer.train_step(b)

    def bare(b):
        _bare_step(bare_model, bare_loss, bare_opt, b, cfg.optim.grad_clip)

    timed_block(system, 3)  # warm-up
    timed_block(bare, 3)
    sys_t, bare_t = [], []
    block = 5
    for _ in range(max(1, args.steps // block)):
        sys_t += timed_block(system, block)
        bare_t += timed_block(bare, block)
    step = {
        "system_step_s_median": statistics.median(sys_t),
        "bare_step_s_median": statistics.median(bare_t),
        "ratio_system_over_bare": statistics.median(sys_t) / statistics.median(bare_t),
        "num_steps_each": len(sys_t),
        "target_ratio": 1.10,
    }

    # Data wait at the config's loader settings: the real loop, loader -> train_step.
    wait = compute = 0.0
    it = iter(trainer.loader)
    next(it)  # pipeline start-up is not steady state
    num_loop = args.steps
    for _ in range(num_loop):
        t0 = time.perf_counter()
        b = next(it)
        t1 = time.perf_counter()
        trainer.train_step(b)
        t2 = time.perf_counter()
        wait += t1 - t0
        compute += t2 - t1
    it.close()
    data = {
        "steps": num_loop,
        "data_wait_fraction": wait / (wait + compute),
        "step_s_with_data": (wait + compute) / num_loop,
        "num_workers": cfg.data.num_workers,
        "global_batch_size": cfg.data.global_batch_size,
        "loader_telemetry": {
            k: v for k, v in trainer.loader.telemetry().items() if isinstance(v, (int, float))
        },
    }

    # Checkpoint save/load against the disk.
    trainer.step = 1000
    t0 = time.perf_counter()
    tag = trainer.save_checkpoint()
    save_s = time.perf_counter() - t0
    size = trainer.ckpt.last_save_bytes
    from avts_dist.distributed.engine import load_engine_checkpoint

    t0 = time.perf_counter()
    load_engine_checkpoint(trainer.engine, trainer.ckpt.local_root, tag)
    load_s = time.perf_counter() - t0
    disk = _disk_throughput(trainer.ckpt.local_root, max(size, 64 << 20))
    ckpt = {
        "bytes": size,
        "save_s": save_s,
        "load_s": load_s,
        "save_MBps": size / save_s / 1e6,
        "load_MBps": size / load_s / 1e6,
        "disk": disk,
        "save_over_disk_write": (size / save_s / 1e6) / disk["write_MBps"],
        "load_over_disk_read": (size / load_s / 1e6) / disk["read_MBps"],
    }
    result = {
        "benchmark": "train",
        "config": args.config,
        "overrides": args.overrides,
        "model_params": sum(p.numel() for p in bare_model.parameters()),
        "zero_stage": cfg.deepspeed.zero_stage,
        "precision": cfg.deepspeed.precision,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "step": step,
        "data": data,
        "checkpoint": ckpt,
    }
    trainer.close()
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
