"""The GPU check's stages, one per process (``tests/gpu/gpu_check.py`` runs and times them):

    python -m tests.gpu.stages NAME --result FILE [--device cpu --dry-run] [--peak F] [--decoder D]

writes ``{"value": ..., "pass": bool}`` (or ``{"skipped": reason}``) to FILE and exits 0 when
the stage passed, 1 when its own check failed, 5 when it was skipped. A crash, an import error or
a hang is the caller's to record.

- ``decoder``: the video decoder the trainer and ``nvdec`` use: torchcodec when it loads beside
  this torch (on a GPU machine that is a CUDA build), else PyAV.
- ``peak``: a measured bf16 matmul rate (8192^3, the mean of 10 after 3 warm-ups): the MFU
  denominator, what this GPU really does, not a datasheet.
- ``nets``: forward+backward clips/s and MFU of r2plus1d_18, mc3_18 and r3d_18 x {fp32, bf16
  autocast} at 3x16x112x112, batch 32, in the contiguous layout: the one the trainer runs (ZeRO
  copies the parameters into flat buffers, so ``channels_last_3d`` weights are not what trains).
  Model FLOPs: forward counted by ``FlopCounterMode`` on the meta device, x3 for the backward.
- ``conv3d_agreement``: every conv3d shape of the three nets at batch 2 and at batch 32 (cuDNN
  picks other kernels at the training batch), bf16 and fp32 against an fp64 reference; and each
  net's output, bf16 autocast against fp32 (cosine similarity).
- ``trainer``: the real trainer (``avts train`` through tests/gpu/trainer_stage.py, env://
  rendezvous, world size 1, ``cpu:gloo,cuda:nccl``, ZeRO-1, bf16, full-size R(2+1)D-18 + VGG
  audio) for 50 steps with the real loader on a synthetic corpus at 112 px, then a resume for 5
  more: data-wait fraction, step time, and host syncs per step counted by CUDA's sync debug mode
  over steps 11-49.
- ``nvdec``: torchcodec's GPU (NVDEC) decode against its CPU decode on the same training-profile
  windows (16 frames at 15 fps of a 228x128 30 fps clip): clips/s each and the frames'
  difference. Skipped when torchcodec does not load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
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
CONV_TOLERANCE = 2e-2  # relative L2 error; bf16 rounding gives ~4e-3, a broken kernel O(1)
COSINE_MIN = 0.99
EXIT_FAILED, EXIT_SKIPPED = 1, 5


class StageSkipped(Exception):
    """The stage cannot run here; its message is the reason."""


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


def pythonpath_env(**extra: str) -> dict:
    """This environment with the repository put first on PYTHONPATH, never replacing it: a bare
    GPU machine's wheels live on PYTHONPATH (pip install --target)."""
    current = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    path = os.pathsep.join([str(REPO), *(p for p in current if p != str(REPO))])
    return dict(os.environ, PYTHONPATH=path, **extra)


# ---- decoder -------------------------------------------------------------------------------


def choose_decoder() -> dict:
    """torchcodec when it loads beside this torch, else PyAV; with the reason."""
    try:
        import torchcodec
        from torchcodec.decoders import VideoDecoder  # noqa: F401  (loads FFmpeg and its core)

        return {"video_decoder": "torchcodec", "torchcodec": torchcodec.__version__,
                "why": f"torchcodec {torchcodec.__version__} loads beside torch "
                       f"{torch.__version__} (CUDA {torch.version.cuda})"}  # fmt: skip
    except Exception as exc:  # ImportError, or RuntimeError/OSError from its shared libraries
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    import av

    return {"video_decoder": "pyav", "av": av.__version__,
            "why": f"torchcodec does not load here ({reason})"}  # fmt: skip


# ---- peak and nets -------------------------------------------------------------------------


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


def bench_nets(device: torch.device, peak: float | None, *, batch: int, frames: int, size: int,
               repeats: int) -> list[dict]:  # fmt: skip
    rows = []
    shape = (batch, 3, frames, size, size)
    for arch in ARCHS:
        flops_per_clip = 3 * forward_flops(arch, (1, *shape[1:]))
        for dtype in ("fp32", "bf16"):
            torch.manual_seed(0)
            net = build_net(arch).to(device)
            x = torch.randn(*shape, device=device)

            def step(net=net, x=x, dtype=dtype):
                with torch.autocast(device.type, torch.bfloat16, enabled=dtype == "bf16"):
                    out = net(x)
                out.float().square().mean().backward()

            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = timed(step, device, warmup=min(2, repeats - 1), repeats=repeats)
            clips_per_s = batch / seconds
            rows.append({
                "arch": arch, "dtype": dtype, "layout": "contiguous", "batch": batch,
                "step_s": seconds, "clips_per_s": clips_per_s,
                "tflops": clips_per_s * flops_per_clip / 1e12,
                "mfu": clips_per_s * flops_per_clip / peak if peak else None,
                "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30
                if device.type == "cuda" else None,
            })  # fmt: skip
            print(f"  {arch:12s} {dtype} {clips_per_s:8.1f} clips/s", flush=True)
            del net, x
    return rows


# ---- conv3d agreement ----------------------------------------------------------------------


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


def conv3d_agreement(device: torch.device, *, batches: tuple[int, ...], frames: int,
                     size: int) -> dict:  # fmt: skip
    worst, rows, shapes = 0.0, [], {}
    for batch in batches:
        for arch in ARCHS:
            for s in conv3d_shapes(arch, (batch, 3, frames, size, size)):
                shapes[json.dumps(s, sort_keys=True)] = s
    gen = torch.Generator(device="cpu").manual_seed(0)
    for s in shapes.values():
        x = torch.randn(*s["input"], generator=gen).to(device)
        w = torch.randn(*s["weight"], generator=gen) / math.sqrt(math.prod(s["weight"][1:]))
        w = w.to(device)
        ref = F.conv3d(x.double(), w.double(), stride=s["stride"], padding=s["padding"])
        errs = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            y = F.conv3d(x.to(dtype), w.to(dtype), stride=s["stride"], padding=s["padding"])
            errs[name] = ((y.double() - ref).norm() / ref.norm()).item()
        worst = max(worst, errs["bf16"])
        rows.append({**s, "rel_err_fp32": errs["fp32"], "rel_err_bf16": errs["bf16"]})
        del x, w, ref
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
    return {"batches": list(batches), "tolerance_rel_l2": CONV_TOLERANCE,
            "max_rel_err_bf16": worst, "num_shapes": len(shapes), "per_shape": rows,
            "net_output_cosine_bf16_vs_fp32": nets, "cosine_min": COSINE_MIN, "pass": ok}  # fmt: skip


# ---- the trainer ---------------------------------------------------------------------------


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_teeing_stderr(cmd: list[str], env: dict) -> tuple[int, str]:
    """Runs ``cmd`` with its stderr passed through live (a timeout still leaves it in the
    stage's log); returns its exit status and the last line it wrote to stderr."""
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
    last = ""
    for line in proc.stderr:
        sys.stderr.write(line)
        sys.stderr.flush()
        last = line.strip() or last
    return proc.wait(), last


def run_trainer(work: Path, *, dry_run: bool, decoder: str) -> dict:
    """The real trainer in a subprocess (as a launcher starts one rank), then a resume."""
    from avts_dist.data.synthetic import synthesize
    from avts_dist.distributed import free_port

    cpus = len(os.sched_getaffinity(0))
    size, frames, batch, steps = (32, 8, 4, 3) if dry_run else (112, 16, 32, 50)
    count_from, count_to = (2, 3) if dry_run else (11, 50)
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
         "model.audio_arch=vgg", "model.audio_width=64", "model.embed_dim=128"]
    )  # fmt: skip
    overrides = [
        f"run.dir={work / 'run'}", "run.name=gpu_check", f"data.url={corpus}",
        f"data.global_batch_size={batch}", f"data.size={size}", f"data.num_frames={frames}",
        f"data.fps={float(frames)}", f"data.num_workers={0 if dry_run else min(12, cpus - 2)}",
        f"data.video_decoder={decoder}", "data.prefetch=16", *model, "deepspeed.zero_stage=1",
        f"deepspeed.precision={'fp32' if dry_run else 'bf16'}", "deepspeed.backend=auto",
        f"train.max_steps={steps}", f"train.log_every={1 if dry_run else 10}",
        "train.val_every_steps=0", "train.deterministic=false", "train.progress=false",
        "tracking.enabled=false", "checkpoint.every_steps=0",
        "curriculum.stages=[{name: easy, negative_mix: {easy: 1.0}}]",
    ]  # fmt: skip
    env = pythonpath_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                         MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))  # fmt: skip
    syncs = work / "syncs.json"
    base = [sys.executable, "-m", "tests.gpu.trainer_stage", "--syncs-out", str(syncs),
            "--count-from", str(count_from), "--count-to", str(count_to), "--config",
            str(REPO / "configs/pretrain/quickstart.yaml")]  # fmt: skip
    result: dict = {"steps": steps, "global_batch_size": batch, "size": size, "frames": frames,
                    "video_decoder": decoder, "synth_s": synth_s}  # fmt: skip
    for phase, extra in (
        ("train", []),
        ("resume", ["resume=auto", f"train.max_steps={steps + 5}", "--count-to", str(steps + 6)]),
        # Accumulation with the global batch's negatives (train/accumulation.py) on the device:
        # the embedding cache replays the device's random state and restores BatchNorm stats.
        (
            "accumulate",
            [
                f"run.dir={work / 'run_accum'}",
                "deepspeed.grad_accum_steps=2",
                "train.max_steps=2",
                "--count-from",
                "1",
                "--count-to",
                "2",
            ],
        ),
    ):
        t0 = time.perf_counter()
        code, last = run_teeing_stderr([*base, *overrides, *extra], env=env)
        result[f"{phase}_wall_s"] = time.perf_counter() - t0
        result[f"{phase}_returncode"] = code
        if code != 0:
            raise RuntimeError(f"avts train ({phase}) exited {code}: {last}")
        if phase == "train":
            result["host_syncs"] = json.loads(syncs.read_text())
    lines = _metrics(work / "run")
    logged = [ln for ln in lines if "data/wait_fraction" in ln and ln["step"] <= steps]
    timed_lines = logged[1:] or logged  # the first window holds the start-up
    step_s = sum(ln["train/step_s"] for ln in timed_lines) / len(timed_lines)
    ours = sum(n for where, n in result["host_syncs"]["by_caller"].items()
               if where.startswith("avts_dist/"))  # fmt: skip
    num_counted = result["host_syncs"]["num_steps"]
    result.update(
        data_wait_fraction=sum(ln["data/wait_fraction"] for ln in timed_lines) / len(timed_lines),
        step_s=step_s, clips_per_s=batch / step_s,
        loader_clips_per_s=timed_lines[-1]["data/clips_per_s"],
        host_syncs_per_step=result["host_syncs"]["syncs_per_step"],
        project_host_syncs_per_step=ours / num_counted if num_counted else None,
        first_loss=lines[0]["loss"], last_loss=lines[steps - 1]["loss"],
        all_finite=all(ln["loss"] is not None for ln in lines),
        resumed_steps=[ln["step"] for ln in lines if ln["step"] > steps],
    )  # fmt: skip
    result["pass"] = (
        result["all_finite"]
        and result["resumed_steps"] == list(range(steps + 1, steps + 6))
        and num_counted == count_to - count_from
    )
    return result


# ---- NVDEC ---------------------------------------------------------------------------------


def decode_gpu_vs_cpu(device: torch.device, *, decoder: str, num_clips: int) -> dict:
    """torchcodec on ``device`` (NVDEC on a GPU) against torchcodec on the CPU, same windows."""
    if decoder != "torchcodec":
        raise StageSkipped("torchcodec does not load here (the decoder stage chose PyAV)")
    import numpy as np
    from torchcodec.decoders import VideoDecoder

    from avts_dist.data.converters.media import EncodeProfile, video_to_mp4
    from tests.benchmarks.bench_decode import (
        CLIP_FPS,
        NUM_FRAMES,
        SOURCE_FPS,
        encode_default_gop,
        render_scene,
    )  # fmt: skip

    seconds = 4.0  # bench_decode's source, shorter: the stage has 40 s
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp, "source.mp4")
        encode_default_gop(render_scene(seconds, SOURCE_FPS, 640, 360, 0), SOURCE_FPS, source)
        mp4, _ = video_to_mp4(source, EncodeProfile())
    rng = np.random.default_rng(0)
    starts = rng.uniform(0, seconds - NUM_FRAMES / CLIP_FPS - 0.1, num_clips)

    def clip(on: str, start: float) -> torch.Tensor:
        dec = VideoDecoder(mp4, device=on, dimension_order="NHWC", seek_mode="exact")
        times = (start + np.arange(NUM_FRAMES) / CLIP_FPS).tolist()
        return dec.get_frames_played_at(times).data

    out: dict = {"num_clips": num_clips, "device": str(device)}
    frames = {}
    for on in dict.fromkeys((device.type, "cpu")):  # once on a CPU-only dry run
        clip(on, float(starts[0]))  # warm-up: the decoder's first open
        _sync(device)
        t0 = time.perf_counter()
        frames[on] = [clip(on, float(s)) for s in starts]
        _sync(device)
        out[f"{on}_clips_per_s"] = num_clips / (time.perf_counter() - t0)
    diffs = [(a.cpu().float() - b.float()).abs().mean().item()
             for a, b in zip(frames[device.type], frames["cpu"], strict=True)]  # fmt: skip
    out["mean_abs_diff_levels"] = max(diffs)  # colour conversion differs slightly on NVDEC
    out["pass"] = out["mean_abs_diff_levels"] < 8.0
    return out


# ---- one stage, as a process ---------------------------------------------------------------

STAGES = ("decoder", "peak", "nets", "conv3d_agreement", "trainer", "nvdec")


def run_stage(name: str, device: torch.device, *, dry_run: bool, peak: float | None,
              decoder: str, work: Path):  # fmt: skip
    dims = dict(batch=2, frames=4, size=32) if dry_run else dict(batch=32, frames=16, size=112)
    if name == "decoder":
        return choose_decoder()
    if name == "peak":
        return matmul_peak(device, 256 if dry_run else 8192, 1 if dry_run else 10)
    if name == "nets":
        return bench_nets(device, peak, repeats=1 if dry_run else 10, **dims)
    if name == "conv3d_agreement":
        batches = (2, 3) if dry_run else (2, 32)  # 32: the training batch
        return conv3d_agreement(device, batches=batches, frames=dims["frames"], size=dims["size"])
    if name == "trainer":
        return run_trainer(work, dry_run=dry_run, decoder=decoder)
    if name == "nvdec":
        return decode_gpu_vs_cpu(device, decoder=decoder, num_clips=4 if dry_run else 64)
    raise ValueError(f"unknown stage {name!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--result", required=True, help="JSON file for the stage's result")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--peak", type=float, default=None, help="bf16 FLOP/s (MFU denominator)")
    parser.add_argument("--decoder", default="pyav", help="data.video_decoder for the trainer")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.dry_run:
        NET_KWARGS.update(width=8, layers=[1, 1, 1, 1])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in these tables
        torch.backends.cudnn.allow_tf32 = False
    result = Path(args.result)
    with tempfile.TemporaryDirectory(prefix=f"avts-gpu-{args.stage}-") as work:
        try:
            value = run_stage(args.stage, device, dry_run=args.dry_run, peak=args.peak,
                              decoder=args.decoder, work=Path(work))  # fmt: skip
        except StageSkipped as exc:
            result.write_text(json.dumps({"skipped": str(exc)}))
            return EXIT_SKIPPED
    passed = value.get("pass", True) if isinstance(value, dict) else True
    result.write_text(json.dumps({"value": value, "pass": passed}, indent=1))
    return 0 if passed else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
