"""Model benchmark: parameters and forward FLOPs of each video net, and tiny-variant step time.

    .venv/bin/python tests/benchmarks/bench_models.py --out bench-results/models.json

- Full-size R3D-18 / MC3-18 / R(2+1)D-18 at 1x3x16x112x112: parameter count and forward FLOPs
  (``torch.utils.flop_counter.FlopCounterMode``, counted on the meta device, so no compute),
  next to torchvision's published figures for its Kinetics-400 weights. torchvision's "GFLOPS"
  count one multiply-add as one op, FlopCounterMode counts it as two: the JSON gives both
  ``gflops`` (FlopCounterMode) and ``gmacs`` (= gflops / 2, comparable to torchvision's column).
- The audio nets (``vgg``, ``tiny``) at 1x1x40x100 (1 s of 40 mel bins at a 10 ms hop).
- Forward+backward time of the tiny CPU variants (each video net alone, and the whole tiny AVTS
  model with negatives) at the default per-rank batch, median over repeats.
- With CUDA: full-size forward+backward throughput (clips/s) and peak memory, bf16 autocast,
  with and without activation checkpointing / channels_last_3d.
Numbers are measured side by side in one run; nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from avts_dist.config import load_config  # noqa: E402
from avts_dist.models import AudioVGG, build_model, mc3_18, r2plus1d_18, r3d_18  # noqa: E402

VIDEO_NETS = {"r3d_18": r3d_18, "mc3_18": mc3_18, "r2plus1d_18": r2plus1d_18}
# torchvision's published meta for the KINETICS400_V1 weights (num_params, _ops in GFLOPS).
TORCHVISION = {
    "r3d_18": {"params": 33_371_472, "gflops": 40.697},
    "mc3_18": {"params": 11_695_440, "gflops": 43.343},
    "r2plus1d_18": {"params": 31_505_325, "gflops": 40.519},
}
TINY_OVERRIDES = [
    "model.video_width=8",
    "model.video_layers=[1,1,1,1]",
    "model.audio_arch=tiny",
    "model.audio_width=8",
    "model.embed_dim=32",
]


def count_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def forward_flops(build, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """(params, forward FLOPs) counted on the meta device: shapes only, no compute."""
    with torch.device("meta"):
        net = build().eval()
        x = torch.empty(*input_shape)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            net(x)
    return count_params(net), counter.get_total_flops()


def time_steps(step, repeats: int, warmup: int = 2) -> dict[str, float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}


def fwd_bwd(net: torch.nn.Module, *inputs: torch.Tensor):
    def step():
        net.zero_grad(set_to_none=True)
        out = net(*inputs)
        loss = (
            sum(v.float().square().mean() for v in out.values() if v is not None)
            if isinstance(out, dict)
            else out.float().square().mean()
        )
        loss.backward()
        if inputs[0].is_cuda:
            torch.cuda.synchronize()

    return step


def bench_flops() -> dict:
    out = {}
    for arch, build in VIDEO_NETS.items():
        params, flops = forward_flops(build, (1, 3, 16, 112, 112))
        ref = TORCHVISION[arch]
        out[arch] = {
            "input": [1, 3, 16, 112, 112],
            "params": params,
            "params_torchvision": ref["params"],
            "params_equal": params == ref["params"],
            "gflops": round(flops / 1e9, 3),
            "gmacs": round(flops / 2e9, 3),
            "gflops_torchvision": ref["gflops"],
            "gmacs_over_torchvision": round(flops / 2e9 / ref["gflops"], 4),
        }
    for arch, width in (("vgg", 64), ("tiny", 8)):
        params, flops = forward_flops(lambda a=arch, w=width: AudioVGG(a, w), (1, 1, 40, 100))
        out[f"audio_{arch}"] = {
            "input": [1, 1, 40, 100],
            "params": params,
            "gflops": round(flops / 1e9, 4),
        }
    return out


def bench_tiny_cpu(batch: int, repeats: int) -> dict:
    cfg = load_config(None, TINY_OVERRIDES)
    data = cfg.data
    mel_frames = int(round(data.clip_seconds * 1000 / data.mel_hop_ms))
    video = torch.randn(batch, 3, data.num_frames, data.size, data.size)
    logmel = torch.randn(batch, 1, data.num_mel_bins, mel_frames)
    out: dict = {
        "batch": batch,
        "video_input": list(video.shape),
        "audio_input": list(logmel.shape),
        "threads": torch.get_num_threads(),
    }
    torch.manual_seed(0)
    for arch, build in VIDEO_NETS.items():
        net = build(width=8, layers=[1, 1, 1, 1], num_classes=0).train()
        out[f"{arch}_tiny"] = {
            "params": count_params(net),
            **time_steps(fwd_bwd(net, video), repeats),
        }
    for arch in VIDEO_NETS:
        model = build_model(
            load_config(None, [*TINY_OVERRIDES, f"model.video_arch={arch}"]).model
        ).train()
        out[f"avts_tiny_{arch}"] = {
            "params": count_params(model),
            **time_steps(fwd_bwd(model, video, logmel, torch.randn_like(logmel)), repeats),
        }
    return out


def bench_cuda(batch: int, repeats: int) -> dict:
    out = {"device": torch.cuda.get_device_name(), "batch": batch, "dtype": "bf16 autocast"}
    video = torch.randn(batch, 3, 16, 112, 112, device="cuda")
    for arch, build in VIDEO_NETS.items():
        for ckpt, cl in ((False, False), (True, False), (False, True)):
            net = build(num_classes=0, activation_checkpointing=ckpt, channels_last_3d=cl)
            net = net.cuda().train()
            step = fwd_bwd(net, video)

            def amp_step(step=step):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    step()

            torch.cuda.reset_peak_memory_stats()
            timing = time_steps(amp_step, repeats)
            key = f"{arch}{'_ckpt' if ckpt else ''}{'_cl3d' if cl else ''}"
            out[key] = {
                **timing,
                "clips_per_s": round(batch / timing["median_s"], 1),
                "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            }
            del net
            torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--batch", type=int, default=8, help="per-rank batch for the tiny nets")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cuda-batch", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {
        "env": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "processor": platform.processor(),
        },
        "flops_16x112x112": bench_flops(),
        "tiny_cpu_fwd_bwd": bench_tiny_cpu(args.batch, args.repeats),
    }
    if torch.cuda.is_available():
        result["cuda_fwd_bwd"] = bench_cuda(args.cuda_batch, args.repeats)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
