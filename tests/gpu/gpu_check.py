"""GPU check: the GPU path measured on one GPU, as JSON (``make gpu-check``; <= 8 min on an H100/H200).

    python -m tests.gpu.gpu_check --out bench-results/gpu-check.json
    python -m tests.gpu.gpu_check --device cpu --dry-run --out /tmp/dry.json   # every code path,
                                                                               # toy sizes, on CPU

1. ``peak``: a measured bf16 matmul rate (8192^3, the mean of 10 after 3 warm-ups): the MFU
   denominator, so MFU is against what this GPU really does, not a datasheet.
2. ``nets``: forward+backward clips/s and MFU of r2plus1d_18, mc3_18 and r3d_18 x {fp32, bf16
   autocast} x {contiguous, channels_last_3d} at 3x16x112x112, batch 32. Model FLOPs: forward
   counted by ``FlopCounterMode`` on the meta device, x3 for forward+backward.
3. ``conv3d_agreement``: every conv3d shape of the three nets, bf16 against fp32 (cuDNN has
   shipped silent bf16 conv3d errors), in both memory layouts; and each net's output, bf16
   autocast against fp32 (cosine similarity).
4. ``trainer``: the real trainer (``avts train`` in a subprocess, env:// rendezvous, world size 1,
   ``cpu:gloo,cuda:nccl``, ZeRO-1, bf16 autocast, full-size R(2+1)D-18 + VGG audio) for 50 steps
   with the real loader on a synthetic corpus at 112 px, then a resume for 5 more steps; reports
   the data-wait fraction, step time and clips/s from its metrics.jsonl.

Without CUDA, and without ``--dry-run``, it measures nothing: it says so and exits 3. A stage whose
packages are missing (deepspeed, torchdata, decord, av, omegaconf: see ``make gpu-wheels``) is
reported as skipped with the package name; the others still run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script: make the repository importable
    sys.path.insert(0, str(REPO))

ARCHS = ("r2plus1d_18", "mc3_18", "r3d_18")
EXIT_NO_GPU = 3
CONV_TOLERANCE = 2e-2  # relative L2 error; bf16 rounding gives ~4e-3, a broken kernel O(1)
COSINE_MIN = 0.99


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, *, warmup: int, repeats: int) -> float:
    """Mean seconds per call of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / repeats


def matmul_peak(device: torch.device, size: int, repeats: int) -> float:
    """Measured bf16 matmul FLOP/s."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    seconds = timed(lambda: a @ b, device, warmup=3, repeats=repeats)
    return 2 * size**3 / seconds


# Net size: full (the real nets) or, for --dry-run, width 8 with one block per stage.
NET_KWARGS: dict = {}


def build_net(arch: str):
    from avts_dist.models.video import video_resnet

    return video_resnet(arch, **NET_KWARGS)


def forward_flops(arch: str, shape: tuple[int, ...]) -> int:
    with torch.device("meta"):
        net = build_net(arch)
        counter = FlopCounterMode(display=False)
        with counter:
            net(torch.empty(*shape))
    return counter.get_total_flops()


def bench_nets(device: torch.device, peak: float, *, batch: int, frames: int, size: int,
               repeats: int) -> list[dict]:  # fmt: skip
    rows = []
    shape = (batch, 3, frames, size, size)
    for arch in ARCHS:
        flops_per_clip = 3 * forward_flops(arch, (1, *shape[1:]))
        for dtype in ("fp32", "bf16"):
            for layout in ("contiguous", "channels_last_3d"):
                torch.manual_seed(0)
                net = build_net(arch).to(device)
                x = torch.randn(*shape, device=device)
                if layout == "channels_last_3d":
                    net = net.to(memory_format=torch.channels_last_3d)
                    x = x.contiguous(memory_format=torch.channels_last_3d)

                def step(net=net, x=x, dtype=dtype):
                    with torch.autocast(device.type, torch.bfloat16, enabled=dtype == "bf16"):
                        out = net(x)
                    out.float().square().mean().backward()

                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                seconds = timed(step, device, warmup=min(2, repeats - 1), repeats=repeats)
                clips_per_s = batch / seconds
                rows.append({
                    "arch": arch, "dtype": dtype, "layout": layout, "batch": batch,
                    "step_s": seconds, "clips_per_s": clips_per_s,
                    "tflops": clips_per_s * flops_per_clip / 1e12,
                    "mfu": clips_per_s * flops_per_clip / peak,
                    "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30
                    if device.type == "cuda" else None,
                })  # fmt: skip
                print(f"  {arch:12s} {dtype} {layout:16s} {clips_per_s:8.1f} clips/s "
                      f"MFU {rows[-1]['mfu']:.3f}", flush=True)  # fmt: skip
                del net, x
    return rows


def conv3d_shapes(arch: str, shape: tuple[int, ...]) -> list[dict]:
    """Every distinct conv3d of ``arch`` with the input shape it sees (one forward, meta)."""
    seen: dict[tuple, dict] = {}

    def hook(module, inputs, _out):
        key = (tuple(inputs[0].shape), tuple(module.weight.shape), module.stride, module.padding)
        seen.setdefault(key, {
            "input": list(inputs[0].shape), "weight": list(module.weight.shape),
            "stride": list(module.stride), "padding": list(module.padding),
        })  # fmt: skip

    with torch.device("meta"):
        net = build_net(arch)
        for m in net.modules():
            if isinstance(m, torch.nn.Conv3d):
                m.register_forward_hook(hook)
        net(torch.empty(*shape))
    return list(seen.values())


def conv3d_agreement(device: torch.device, *, batch: int, frames: int, size: int) -> dict:
    worst, rows = 0.0, []
    shapes = {}
    for arch in ARCHS:
        for s in conv3d_shapes(arch, (batch, 3, frames, size, size)):
            shapes[json.dumps(s, sort_keys=True)] = s
    gen = torch.Generator(device="cpu").manual_seed(0)
    for s in shapes.values():
        x = torch.randn(*s["input"], generator=gen).to(device)
        w = torch.randn(*s["weight"], generator=gen) / math.sqrt(math.prod(s["weight"][1:]))
        w = w.to(device)
        ref = F.conv3d(x.double(), w.double(), stride=s["stride"], padding=s["padding"])
        for layout in ("contiguous", "channels_last_3d"):
            fmt = (
                torch.channels_last_3d if layout == "channels_last_3d" else torch.contiguous_format
            )
            xs, ws = x.contiguous(memory_format=fmt), w.contiguous(memory_format=fmt)
            errs = {}
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                y = F.conv3d(xs.to(dtype), ws.to(dtype), stride=s["stride"], padding=s["padding"])
                errs[name] = ((y.double() - ref).norm() / ref.norm()).item()
            worst = max(worst, errs["bf16"])
            rows.append({**s, "layout": layout, "rel_err_fp32": errs["fp32"],
                         "rel_err_bf16": errs["bf16"]})  # fmt: skip
    nets = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        net = build_net(arch).to(device).eval()
        x = torch.randn(2, 3, frames, size, size, device=device)
        with torch.no_grad():
            y32 = net(x).float()
            with torch.autocast(device.type, torch.bfloat16):
                y16 = net(x).float()
        nets[arch] = F.cosine_similarity(y32.flatten(), y16.flatten(), dim=0).item()
    ok = worst <= CONV_TOLERANCE and min(nets.values()) >= COSINE_MIN
    return {"tolerance_rel_l2": CONV_TOLERANCE, "max_rel_err_bf16": worst, "num_shapes": len(shapes),
            "per_shape": rows, "net_output_cosine_bf16_vs_fp32": nets, "cosine_min": COSINE_MIN,
            "pass": ok}  # fmt: skip


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_trainer(device: torch.device, work: Path, *, dry_run: bool) -> dict:
    """The real trainer in a subprocess (as a launcher starts one rank), then a resume."""
    from avts_dist.data.synthetic import synthesize
    from avts_dist.distributed import free_port

    cpus = os.cpu_count() or 2
    size, frames, batch, steps = (32, 8, 4, 3) if dry_run else (112, 16, 32, 50)
    corpus = work / "corpus"
    t0 = time.perf_counter()
    synthesize(
        str(corpus), num_videos=8 if dry_run else 128, seconds=2.0 if dry_run else 3.0,
        fps=float(frames), size=size if dry_run else 128, sample_rate=16000, num_classes=4,
        shard_size=16, seed=0, val_fraction=0.0, num_workers=max(1, cpus - 1),
    )  # fmt: skip
    synth_s = time.perf_counter() - t0
    model = (
        ["model.video_arch=mc3_18", "model.video_width=8", "model.video_layers=[1,1,1,1]",
         "model.audio_arch=tiny", "model.audio_width=8", "model.embed_dim=32"]
        if dry_run else
        ["model.video_arch=r2plus1d_18", "model.video_width=64", "model.video_layers=[2,2,2,2]",
         "model.audio_arch=vgg", "model.audio_width=64", "model.embed_dim=128",
         "model.channels_last_3d=true"]
    )  # fmt: skip
    overrides = [
        f"run.dir={work / 'run'}", "run.name=gpu_check", f"data.url={corpus}",
        f"data.global_batch_size={batch}", f"data.size={size}", f"data.num_frames={frames}",
        f"data.fps={float(frames)}", f"data.num_workers={0 if dry_run else min(12, cpus - 2)}",
        "data.prefetch=16", *model, "deepspeed.zero_stage=1",
        f"deepspeed.precision={'fp32' if dry_run else 'bf16'}", "deepspeed.backend=auto",
        f"train.max_steps={steps}", f"train.log_every={1 if dry_run else 10}",
        "train.val_every_steps=0", "train.deterministic=false", "train.progress=false",
        "tracking.enabled=false", "checkpoint.every_steps=0",
        "curriculum.stages=[{name: easy, negative_mix: {easy: 1.0}}]",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
               LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))  # fmt: skip
    base = [sys.executable, "-m", "avts_dist", "train", "--config",
            str(REPO / "configs/pretrain/quickstart.yaml")]  # fmt: skip
    result: dict = {"steps": steps, "global_batch_size": batch, "size": size, "frames": frames,
                    "synth_s": synth_s}  # fmt: skip
    for phase, extra in (
        ("train", []),
        ("resume", ["resume=auto", f"train.max_steps={steps + 5}"]),
    ):
        t0 = time.perf_counter()
        proc = subprocess.run([*base, *overrides, *extra], env=env, capture_output=True,
                              text=True, timeout=420)  # fmt: skip
        result[f"{phase}_wall_s"] = time.perf_counter() - t0
        result[f"{phase}_returncode"] = proc.returncode
        if proc.returncode != 0:
            result[f"{phase}_stderr_tail"] = proc.stderr[-4000:]
            return result
    # Accumulation with the global batch's negatives (train/accumulation.py) on the device: the
    # embedding cache replays CUDA's random state and restores BatchNorm statistics.
    t0 = time.perf_counter()
    accum = [f"run.dir={work / 'run_accum'}", "deepspeed.grad_accum_steps=2", "train.max_steps=2"]
    proc = subprocess.run([*base, *overrides, *accum], env=env, capture_output=True, text=True,
                          timeout=420)  # fmt: skip
    result["accumulate_wall_s"] = time.perf_counter() - t0
    result["accumulate_returncode"] = proc.returncode
    if proc.returncode != 0:
        result["accumulate_stderr_tail"] = proc.stderr[-4000:]
        return result
    lines = _metrics(work / "run")
    logged = [ln for ln in lines if "data/wait_fraction" in ln and ln["step"] <= steps]
    timed_lines = logged[1:] or logged  # the first window holds the start-up
    step_s = sum(ln["train/step_s"] for ln in timed_lines) / len(timed_lines)
    result.update(
        data_wait_fraction=sum(ln["data/wait_fraction"] for ln in timed_lines) / len(timed_lines),
        step_s=step_s, clips_per_s=batch / step_s,
        loader_clips_per_s=timed_lines[-1]["data/clips_per_s"],
        first_loss=lines[0]["loss"], last_loss=lines[steps - 1]["loss"],
        all_finite=all(ln["loss"] is not None for ln in lines),
        resumed_steps=[ln["step"] for ln in lines if ln["step"] > steps],
    )  # fmt: skip
    result["pass"] = result["all_finite"] and result["resumed_steps"] == list(
        range(steps + 1, steps + 6)
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dry-run", action="store_true",
                        help="toy sizes, one repeat: runs every code path (CPU allowed); "
                             "its figures are not measurements")  # fmt: skip
    parser.add_argument("--skip", default="", help="comma-separated stages to leave out")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: skipped: no GPU (CUDA is not available here); nothing was measured",
              file=sys.stderr)  # fmt: skip
        return EXIT_NO_GPU
    if args.device == "cpu" and not args.dry_run:
        print("gpu-check: --device cpu needs --dry-run (a CPU measures nothing of the GPU path)",
              file=sys.stderr)  # fmt: skip
        return 2
    device = torch.device(args.device)
    if args.dry_run:
        NET_KWARGS.update(width=8, layers=[1, 1, 1, 1])
    skip = set(filter(None, args.skip.split(",")))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in this table
        torch.backends.cudnn.allow_tf32 = False
    t_start = time.perf_counter()
    report: dict = {
        "dry_run": args.dry_run, "device": torch.cuda.get_device_name(device)
        if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(), "skipped": {},
    }  # fmt: skip
    dims = dict(batch=2, frames=4, size=32) if args.dry_run else dict(batch=32, frames=16, size=112)
    stages = {
        "peak": lambda: matmul_peak(device, 256 if args.dry_run else 8192, 1 if args.dry_run else 10),
        "nets": lambda: bench_nets(device, report.get("peak_bf16_flops", math.nan), repeats=1 if args.dry_run else 10, **dims),
        "conv3d_agreement": lambda: conv3d_agreement(device, **{**dims, "batch": 2}),
        "trainer": lambda: run_trainer(device, work, dry_run=args.dry_run),
    }  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="avts-gpu-check-"))
    try:
        for name, stage in stages.items():
            if name in skip:
                report["skipped"][name] = "--skip"
                continue
            print(f"gpu-check: {name}", flush=True)
            t0 = time.perf_counter()
            try:
                value = stage()
            except ModuleNotFoundError as exc:
                report["skipped"][name] = f"missing package {exc.name} (see make gpu-wheels)"
                print(f"gpu-check: {name} skipped: {report['skipped'][name]}", file=sys.stderr)
                continue
            key = "peak_bf16_flops" if name == "peak" else name
            report[key] = value
            report[f"{name}_s"] = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["elapsed_s"] = time.perf_counter() - t_start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    failed = [k for k in ("conv3d_agreement", "trainer") if not report.get(k, {}).get("pass", True)]
    print(f"gpu-check: wrote {args.out} in {report['elapsed_s']:.0f}s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
