"""Loss + cross-rank gather benchmark, and the cost model of gathering at scale.

    OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/bench_loss.py --out bench-results/loss.json

1. ``step_time``: with real gloo process groups of 1 and 2 CPU processes, the median time of
   (a) the tiny AVTS model's forward+backward (contract C's tiny CPU variant, data.* defaults),
   (b) the loss forward+backward including the exact all-gather of both embeddings,
   (c) the gather alone (forward+backward), at the default global batch and at 64.
2. ``memory``: bytes the loss keeps for backward (counted with
   ``torch.autograd.graph.saved_tensors_hooks``) and bytes of the gathered embeddings, against
   global batch size, per rank, for world sizes 1 and 2.
3. ``cost_model``: bytes communicated per step by the gather, FLOPs of the distance matrices and
   their memory per rank, for 8, 64 and 512 GPUs at global batch 4096 and embed dims 128 / 512,
   next to the model's own compute and gradient all-reduce (constants are flags).
Measured side by side in one run; nothing asserts a speed. docs/loss-and-curriculum.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from avts_dist.config import DataConfig, LossConfig, load_config  # noqa: E402

TINY_MODEL = [
    "model.video_width=8",
    "model.video_layers=[1,1,1,1]",
    "model.audio_arch=tiny",
    "model.audio_width=8",
    "model.embed_dim=32",
]


def _median_s(fn, repeats: int, barrier) -> float:
    fn()  # warm-up (allocations, gloo connections)
    times = []
    for _ in range(repeats):
        barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn`` runs (distinct storages)."""
    seen: dict[int, int] = {}

    def pack(t):
        try:
            key = t.untyped_storage().data_ptr()
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _worker(rank, world_size, port, args, out_path):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )  # fmt: skip
    torch.set_num_threads(1)
    from avts_dist.distributed import all_gather_with_grad, barrier, destroy, init_distributed
    from avts_dist.losses import build_loss
    from avts_dist.models import build_model

    init_distributed("gloo", timeout_s=300)
    data = DataConfig()
    model_cfg = load_config(None, TINY_MODEL).model
    torch.manual_seed(0)
    model = build_model(model_cfg)
    loss_fn = build_loss(LossConfig())
    num_mel_frames = round(data.clip_seconds * 1000 / data.mel_hop_ms)
    result = {"world_size": world_size, "step_time": [], "memory": []}

    for global_batch in args.batches:
        b = global_batch // world_size
        video = torch.randn(b, 3, data.num_frames, data.size, data.size)
        audio = torch.randn(b, 1, data.num_mel_bins, num_mel_frames)
        neg = torch.randn_like(audio)
        kind = torch.randint(0, 3, (b,))

        def model_step(video=video, audio=audio, neg=neg):
            out = model(video, audio, neg)
            (
                out["video_emb"].sum() + out["audio_emb"].sum() + out["neg_audio_emb"].sum()
            ).backward()

        with torch.no_grad():
            emb = model(video, audio, neg)
        v0, a0, n0 = (emb[k].detach() for k in ("video_emb", "audio_emb", "neg_audio_emb"))

        def loss_step(v0=v0, a0=a0, n0=n0, kind=kind):
            v, a, n = (x.clone().requires_grad_(True) for x in (v0, a0, n0))
            out = loss_fn(v, a, n, kind, rank=rank, world_size=world_size)
            out["loss"].backward()

        def gather_step(v0=v0, a0=a0):
            v, a = (x.clone().requires_grad_(True) for x in (v0, a0))
            (all_gather_with_grad(v).sum() + all_gather_with_grad(a).sum()).backward()

        t_model = _median_s(model_step, args.repeats, barrier)
        t_loss = _median_s(loss_step, args.repeats, barrier)
        t_gather = _median_s(gather_step, args.repeats, barrier)
        result["step_time"].append(
            {
                "global_batch": global_batch,
                "local_batch": b,
                "embed_dim": model_cfg.embed_dim,
                "model_fwd_bwd_ms": 1e3 * t_model,
                "loss_with_gather_fwd_bwd_ms": 1e3 * t_loss,
                "gather_only_fwd_bwd_ms": 1e3 * t_gather,
                "loss_over_model": t_loss / t_model,
            }
        )

    for dim in args.dims:
        for global_batch in args.memory_batches:
            b = global_batch // world_size
            gen = torch.Generator().manual_seed(rank)
            v, a, n = (torch.randn(b, dim, generator=gen).requires_grad_(True) for _ in range(3))
            kind = torch.randint(0, 3, (b,), generator=gen)
            saved = _saved_bytes(lambda v=v, a=a, n=n, kind=kind, b=b: loss_fn(
                v, a, n, kind, rank=rank, world_size=world_size
            ))  # fmt: skip
            result["memory"].append(
                {
                    "global_batch": global_batch,
                    "local_batch": b,
                    "embed_dim": dim,
                    # Two gathered [B, D] fp32 tensors (video and audio) live on every rank.
                    "gathered_embeddings_bytes": 2 * global_batch * dim * 4,
                    "loss_saved_for_backward_bytes": saved,
                }
            )
    if rank == 0:
        Path(out_path).write_text(json.dumps(result))
    destroy()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cost_model(args) -> list[dict]:
    """Per-step costs of the gathered loss, per rank, from first principles.

    - gather forward: all-gather of video and audio embeddings, each rank receives (and, in a
      ring, sends) (N-1) * b * D * s bytes per tensor; backward: reduce-scatter of the same
      size (NCCL; gloo does an all-reduce, twice that). Total = 4 (N-1)/N * B * D * s.
    - distance matrices (symmetric loss): 2 directions * 2 b B D FLOPs forward, about twice that
      backward -> 12 b B D FLOPs per rank; memory of about 7 [b, B] fp32 matrices.
    - ring latency: a ring all-gather/reduce-scatter takes N-1 steps; 4 collectives per step.
    Against: the model's compute per rank (3 x forward FLOPs x b) and its gradient all-reduce
    (ring: 2 (N-1)/N * params * s bytes), which overlaps with backward; the embedding gather
    does not overlap (the loss needs it), so it is on the critical path.
    """
    rows = []
    s = args.bytes_per_elem
    for dim in (128, 512):
        for n in (8, 64, 512):
            big_b = args.global_batch
            b = big_b // n
            gather_bytes = 4 * (n - 1) / n * big_b * dim * s
            gather_bw_s = gather_bytes / (args.link_gbps * 1e9)
            gather_lat_s = 4 * (n - 1) * args.hop_latency_us * 1e-6
            dist_flops = 12 * b * big_b * dim
            # [b, B] fp32 matrices autograd keeps: about 7 for the symmetric contrastive loss
            # (measured by the memory section: sqrt/clamp/hinge/scatter per direction).
            dist_mem = 7 * b * big_b * 4
            model_flops = 3 * 2 * args.model_gmacs * 1e9 * b  # fwd+bwd, 2 FLOPs per MAC
            model_s = model_flops / (args.gpu_tflops * 1e12)
            grad_bytes = 2 * (n - 1) / n * args.num_params * s
            rows.append(
                {
                    "num_gpus": n,
                    "global_batch": big_b,
                    "local_batch": b,
                    "embed_dim": dim,
                    "gather_bytes_per_rank": gather_bytes,
                    "gather_bandwidth_ms": 1e3 * gather_bw_s,
                    "gather_latency_ms": 1e3 * gather_lat_s,
                    "gather_ms": 1e3 * (gather_bw_s + gather_lat_s),
                    "distance_gflops_per_rank": dist_flops / 1e9,
                    "distance_ms": 1e3 * dist_flops / (args.gpu_tflops * 1e12),
                    "distance_matrix_mib_per_rank": dist_mem / 2**20,
                    "gathered_embeddings_mib": 2 * big_b * dim * s / 2**20,
                    "model_tflops_per_rank": model_flops / 1e12,
                    "model_compute_ms": 1e3 * model_s,
                    "grad_allreduce_bytes_per_rank": grad_bytes,
                    "grad_allreduce_ms": 1e3
                    * (
                        grad_bytes / (args.link_gbps * 1e9)
                        + 2 * (n - 1) * args.hop_latency_us * 1e-6
                    ),
                    "gather_over_model_compute": gather_bw_s / model_s + gather_lat_s / model_s,
                }
            )
    return rows


def crossover(args) -> dict:
    """Where the (latency-bound) gather costs 10% and 100% of the per-rank model compute:
    4 (N-1) alpha = r * 6 G B / (N F)  ->  N ~ sqrt(r * 6 G B / (4 alpha F))."""
    per_step = 6 * args.model_gmacs * 1e9 * args.global_batch / (args.gpu_tflops * 1e12)
    alpha = args.hop_latency_us * 1e-6
    return {
        f"num_gpus_where_gather_is_{int(r * 100)}pct_of_compute": (r * per_step / (4 * alpha))
        ** 0.5
        for r in (0.1, 1.0)
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batches", type=int, nargs="+", default=[DataConfig().global_batch_size, 64])
    p.add_argument("--memory-batches", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--dims", type=int, nargs="+", default=[128, 512])
    p.add_argument("--repeats", type=int, default=10)
    # Cost-model constants (H100 cluster defaults; change them for another fabric).
    p.add_argument("--global-batch", type=int, default=4096)
    p.add_argument("--bytes-per-elem", type=int, default=4, help="4 fp32 embeddings, 2 bf16")
    p.add_argument("--link-gbps", type=float, default=50.0, help="GB/s per GPU across nodes")
    p.add_argument("--hop-latency-us", type=float, default=10.0, help="per ring step")
    p.add_argument("--gpu-tflops", type=float, default=400.0, help="achieved bf16 TFLOP/s")
    p.add_argument("--model-gmacs", type=float, default=40.5 + 2.0,
                   help="per clip: R(2+1)D-18 at 16x112x112 (torchvision) + audio net")  # fmt: skip
    p.add_argument("--num-params", type=float, default=31.5e6 + 4.5e6)
    args = p.parse_args(argv)

    report = {
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "defaults": {"global_batch_size": DataConfig().global_batch_size, "loss": "contrastive/all/symmetric"},
        "runs": [],
        "cost_model_constants": {
            k: getattr(args, k)
            for k in ("global_batch", "bytes_per_elem", "link_gbps", "hop_latency_us", "gpu_tflops", "model_gmacs", "num_params")
        },
        "cost_model": cost_model(args),
        "crossover": crossover(args),
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.world_sizes:
            out = Path(tmp) / f"w{n}.json"
            mp.spawn(_worker, args=(n, _free_port(), args, str(out)), nprocs=n, join=True)
            report["runs"].append(json.loads(out.read_text()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report["runs"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
