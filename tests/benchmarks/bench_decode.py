"""Video decoders side by side: CPU ms per training clip and RSS growth, on the same clips in one run.

python tests/benchmarks/bench_decode.py --out decode.json [--clips 100] [--rss-clips 5000]

A clip is what the loader asks for: 16 frames at stride 2 of a 30 fps source (``fps=15``) at a
random start, decoded from bytes in memory with one thread, resized (short side 112) and
centre-cropped to 112x112, through ``decode_video(..., decoder=...)``. Two sources, 10 s each,
rendered here (a textured scene panning under moving objects, with sensor noise, so the encoder
has real work; bit rates are in the JSON):

- ``360p_default_gop``: 640x360, 30 fps, libx264 with its defaults (preset medium, crf 23, a
  keyframe every 250 frames at most, B-frames), AAC stereo 44.1 kHz, like an AudioSet/Kinetics
  download;
- ``training_profile``: that source through ``avts prepare``'s training profile (228x128, 30 fps,
  a keyframe every second), i.e. ``video_to_mp4(path, EncodeProfile())``.

Every decoder decodes the same windows, interleaved clip by clip so that machine noise hits all
alike; frames are checked against PyAV's (max abs difference, in levels of 255). RSS growth is
measured in one fresh process per decoder over ``--rss-clips`` clips of the training-profile
source (RSS after every tenth of them: growth after the first tenth, and over the second half). The audio side of a sample (decode
and log-mel, with a same-clip and an other-clip negative) is timed on the training profile too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import av  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from avts_dist.config import DataConfig  # noqa: E402
from avts_dist.data.converters.media import EncodeProfile, video_to_mp4  # noqa: E402
from avts_dist.data.decode import DEFAULT_VIDEO_DECODER, VIDEO_DECODERS, decode_video  # noqa: E402
from avts_dist.data.decoders import resolve_video_decoder  # noqa: E402
from avts_dist.data.frames import read_frames  # noqa: E402

SOURCE_SECONDS = 10.0
SOURCE_FPS = 30
NUM_FRAMES, CLIP_FPS, SIZE = 16, 15.0, 112  # 16 frames at stride 2 of 30 fps, 112x112


def render_scene(seconds: float, fps: int, width: int, height: int, seed: int) -> np.ndarray:
    """``uint8 [T, H, W, 3]``: a multi-octave noise texture panned by a moving camera, three
    moving discs, and per-frame sensor noise."""
    rng = np.random.default_rng(seed)
    canvas_h, canvas_w = 2 * height, 2 * width
    texture = torch.zeros(1, 3, canvas_h, canvas_w)
    for cell, weight in ((96, 0.55), (24, 0.25), (6, 0.12), (2, 0.08)):
        coarse = torch.from_numpy(rng.random((1, 3, canvas_h // cell + 2, canvas_w // cell + 2)))
        texture += weight * F.interpolate(coarse.float(), size=(canvas_h, canvas_w), mode="bicubic")
    texture = (texture.clamp(0, 1)[0].permute(1, 2, 0).numpy() * 220 + 15).astype(np.float32)
    num_frames = int(seconds * fps)
    yy, xx = np.mgrid[0:height, 0:width]
    discs = [(rng.uniform(0, width), rng.uniform(0, height), rng.uniform(-4, 4),
              rng.uniform(-3, 3), rng.uniform(10, 30), rng.uniform(0, 255, 3)) for _ in range(3)]  # fmt: skip
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        x0 = int((width / 2) * (1 + np.sin(t / (2.5 * fps))))
        y0 = int((height / 2) * (1 + np.sin(t / (3.7 * fps) + 1.0)))
        frame = texture[y0 : y0 + height, x0 : x0 + width].copy()
        for cx, cy, vx, vy, r, colour in discs:
            px, py = (cx + vx * t) % width, (cy + vy * t) % height
            frame[(xx - px) ** 2 + (yy - py) ** 2 < r * r] = colour
        frame += rng.normal(0, 4, frame.shape).astype(np.float32)
        frames[t] = np.clip(frame, 0, 255).astype(np.uint8)
    return frames


def render_audio(seconds: float, sample_rate: int, seed: int) -> np.ndarray:
    """``float32 [2, N]`` stereo: noise bursts over a few drifting tones (speech-like density)."""
    rng = np.random.default_rng(seed + 1)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    wave = sum(0.1 * np.sin(2 * np.pi * f * t * (1 + 0.01 * np.sin(t))) for f in (220, 330, 880))
    envelope = (np.sin(2 * np.pi * 3 * t) > 0.3).astype(np.float32)
    wave = wave + 0.2 * envelope * rng.standard_normal(t.size)
    return np.stack([wave, np.roll(wave, 37)]).astype(np.float32)


def encode_default_gop(frames: np.ndarray, fps: int, path: Path) -> None:
    """libx264 with its defaults: preset medium, crf 23, keyint 250, scene cuts, B-frames;
    AAC stereo at 44.1 kHz, 128 kbit/s (a download's audio)."""
    sample_rate = 44100
    audio = render_audio(len(frames) / fps, sample_rate, seed=int(frames[0, 0, 0, 0]))
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        a_stream = out.add_stream("aac", rate=sample_rate, layout="stereo")
        a_stream.bit_rate = 128_000
        for i, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
        for start in range(0, audio.shape[1], 1024):
            chunk = np.ascontiguousarray(audio[:, start : start + 1024])
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
            frame.sample_rate, frame.pts = sample_rate, start
            frame.time_base = Fraction(1, sample_rate)
            out.mux(a_stream.encode(frame))
        out.mux(a_stream.encode(None))


def time_audio(mp4: bytes, num_samples: int, seed: int) -> dict:
    """CPU ms of a sample's audio as the loader does it (decode_audio of the span needed, then a
    log-mel per window): a same-clip negative (hard/super-hard: one decode of a span covering both
    windows) and an other-clip negative (easy: two decodes of one window each)."""
    from avts_dist.data.decode import audio_window, decode_audio, logmel

    cfg = DataConfig()
    clip_s = NUM_FRAMES / CLIP_FPS
    rng = np.random.default_rng(seed + 2)
    same, other = [], []
    for _ in range(num_samples):
        a, b = sorted(rng.uniform(0.0, SOURCE_SECONDS - clip_s - 0.1, 2).tolist())
        t0 = time.process_time()
        wave = decode_audio(mp4, cfg.sample_rate, a, b + clip_s)
        for start in (0.0, b - a):
            logmel(audio_window(wave, cfg.sample_rate, start, clip_s), cfg.sample_rate)
        t1 = time.process_time()
        for start in (a, b):
            wave = decode_audio(mp4, cfg.sample_rate, start, start + clip_s)
            logmel(audio_window(wave, cfg.sample_rate, 0.0, clip_s), cfg.sample_rate)
        t2 = time.process_time()
        same.append(1000 * (t1 - t0))
        other.append(1000 * (t2 - t1))
    return {
        "same_clip_negative_cpu_ms": _summary(same),
        "other_clip_negative_cpu_ms": _summary(other),
    }


def describe(mp4: bytes) -> dict:
    with av.open(__import__("io").BytesIO(mp4)) as container:
        stream = container.streams.video[0]
        packets = [p for p in container.demux(stream) if p.pts is not None]
        keyframes = sorted(float(p.pts * p.time_base) for p in packets if p.is_keyframe)
        return {
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "fps": float(stream.average_rate),
            "num_frames": len(packets),
            "keyframes_s": [round(k, 3) for k in keyframes],
            "bytes": len(mp4),
            "kbit_per_s": round(8 * len(mp4) / SOURCE_SECONDS / 1000, 1),
            "audio": None
            if not container.streams.audio
            else {
                "codec": container.streams.audio[0].codec_context.name,
                "sample_rate": container.streams.audio[0].codec_context.sample_rate,
                "channels": container.streams.audio[0].codec_context.layout.nb_channels,
            },
        }


def make_sources(work: Path, seed: int) -> dict[str, bytes]:
    frames = render_scene(SOURCE_SECONDS, SOURCE_FPS, 640, 360, seed)
    path = work / "source_360p.mp4"
    encode_default_gop(frames, SOURCE_FPS, path)
    profile, _ = video_to_mp4(path, EncodeProfile())
    return {"360p_default_gop": path.read_bytes(), "training_profile": profile}


def _clip(mp4: bytes, start: float, decoder: str) -> torch.Tensor:
    return decode_video(mp4, start, NUM_FRAMES, CLIP_FPS, SIZE, False, decoder=decoder)


def _summary(values: list[float]) -> dict:
    return {
        "mean": round(float(np.mean(values)), 2),
        "median": round(float(np.median(values)), 2),
        "p90": round(float(np.percentile(values, 90)), 2),
    }


def time_decoders(sources: dict[str, bytes], num_clips: int, seed: int) -> dict:
    """Per source and decoder: CPU ms of the frames alone (``read_frames``: decode + RGB, what
    issue 10's reference table measured) and of the whole clip (``decode_video``: plus the
    resize to 112, crop and normalisation), on the same windows, decoders interleaved."""
    rng = np.random.default_rng(seed)
    last_start = SOURCE_SECONDS - NUM_FRAMES / CLIP_FPS - 0.05
    result = {}
    for name, mp4 in sources.items():
        starts = rng.uniform(0.0, last_start, num_clips).round(3).tolist()
        frames_ms = {d: [] for d in VIDEO_DECODERS}
        clip_ms = {d: [] for d in VIDEO_DECODERS}
        max_diff = dict.fromkeys(VIDEO_DECODERS, 0)
        for d in VIDEO_DECODERS:  # warm-up: imports, first-call allocations
            _clip(mp4, starts[0], d)
        for start in starts:
            frames = {}
            for d in VIDEO_DECODERS:
                t0 = time.process_time()
                frames[d], _ = read_frames(mp4, start, NUM_FRAMES, CLIP_FPS, decoder=d)
                t1 = time.process_time()
                _clip(mp4, start, d)
                t2 = time.process_time()
                frames_ms[d].append(1000 * (t1 - t0))
                clip_ms[d].append(1000 * (t2 - t1))
            for d in VIDEO_DECODERS:
                diff = int((frames[d].int() - frames["pyav"].int()).abs().max())
                max_diff[d] = max(max_diff[d], diff)
        result[name] = {
            d: {
                "frames_cpu_ms": _summary(frames_ms[d]),
                "clip_cpu_ms": _summary(clip_ms[d]),
                "max_abs_diff_vs_pyav_of_255": max_diff[d],
            }
            for d in VIDEO_DECODERS
        }
    return result


def audio_decode_calls(num_batches: int, seed: int) -> dict:
    """Audio decodes per sample through the real loader (one worker process is not needed:
    ``num_workers=0``) on a small synthetic corpus, per negative kind: a positive and a same-clip
    (hard/super-hard) negative share one decode; an easy negative decodes its own clip."""
    import avts_dist.data.dataset as loader_module  # the worker side decodes
    from avts_dist.data.loader import build_loader
    from avts_dist.data.synthetic import synthesize

    calls = 0
    real = loader_module.decode_audio

    def counting(*args, **kwargs):
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)

    result = {}
    with tempfile.TemporaryDirectory(prefix="avts-bench-calls-") as tmp:
        url = str(Path(tmp) / "synth")
        synthesize(url, num_videos=16, seconds=3.0, fps=8.0, size=32, sample_rate=16000,
                   num_classes=4, shard_size=8, seed=seed, val_fraction=0.0)  # fmt: skip
        loader_module.decode_audio = counting
        try:
            for kind in ("easy", "hard", "superhard"):
                cfg = DataConfig(url=url, global_batch_size=4, num_workers=0, num_frames=8,
                                 fps=8.0, size=32, negative_mix={kind: 1.0}, seed=seed)  # fmt: skip
                calls, samples = 0, 0
                for _, batch in zip(range(num_batches), build_loader(cfg), strict=False):
                    samples += len(batch["label"])
                result[kind] = {"samples": samples, "audio_decodes_per_sample": calls / samples}
        finally:
            loader_module.decode_audio = real
    return result


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_child(mp4_path: str, decoder: str, num_clips: int, seed: int) -> dict:
    """Runs in a fresh process: RSS after every tenth of the clips. Growth from the first tenth
    (the warm-up) to the end, and over the second half alone: a leak keeps growing there, an
    allocator settling does not."""
    torch.set_num_threads(1)
    mp4 = Path(mp4_path).read_bytes()
    rng = np.random.default_rng(seed)
    starts = rng.uniform(0.0, SOURCE_SECONDS - NUM_FRAMES / CLIP_FPS - 0.05, num_clips)
    tenth = max(1, num_clips // 10)
    curve = []
    t0 = time.process_time()
    for i, start in enumerate(starts):
        _clip(mp4, float(start), decoder)
        if (i + 1) % tenth == 0:
            curve.append(round(_rss_mb(), 1))
    half = curve[len(curve) // 2 - 1]
    return {
        "clips": num_clips,
        "rss_mb_every_tenth": curve,
        "rss_growth_mb": round(curve[-1] - curve[0], 1),
        "rss_growth_mb_second_half": round(curve[-1] - half, 1),
        "rss_growth_kb_per_clip_second_half": round(
            1024 * (curve[-1] - half) / (num_clips - (len(curve) // 2) * tenth), 2
        ),
        "cpu_ms_per_clip": round(1000 * (time.process_time() - t0) / num_clips, 2),
    }


def measure_rss(mp4: bytes, work: Path, num_clips: int, seed: int) -> dict:
    path = work / "training_profile.mp4"
    path.write_bytes(mp4)
    out = {}
    for d in VIDEO_DECODERS:
        cmd = [sys.executable, __file__, "--rss-child", str(path), d, str(num_clips), str(seed)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[d] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"rss {d}: {out[d]}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="JSON file to write (required)")
    parser.add_argument("--clips", type=int, default=100, help="timed clips per source")
    parser.add_argument("--rss-clips", type=int, default=5000, help="clips per decoder for RSS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rss-child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument(
        "--audio-calls-only", action="store_true", help="only count audio decodes per sample"
    )
    args = parser.parse_args(argv)
    if args.rss_child:
        path, decoder, num_clips, seed = args.rss_child
        print(json.dumps(rss_child(path, decoder, int(num_clips), int(seed))))
        return 0
    if not args.out:
        parser.error("--out is required")
    if args.audio_calls_only:
        calls = audio_decode_calls(num_batches=16, seed=args.seed)
        Path(args.out).write_text(json.dumps({"audio_decodes_per_sample": calls}, indent=1))
        print(json.dumps(calls))
        return 0
    torch.set_num_threads(1)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="avts-bench-decode-") as tmp:
        work = Path(tmp)
        sources = make_sources(work, args.seed)
        print({name: describe(mp4) for name, mp4 in sources.items()}, flush=True)
        timing = time_decoders(sources, args.clips, args.seed)
        print(json.dumps(timing, indent=1), flush=True)
        audio = time_audio(sources["training_profile"], args.clips, args.seed)
        print(json.dumps(audio), flush=True)
        rss = measure_rss(sources["training_profile"], work, args.rss_clips, args.seed)
    # "Correct": frames within 2 levels of 255 of PyAV's on every window of both sources.
    correct = [
        d
        for d in VIDEO_DECODERS
        if all(timing[s][d]["max_abs_diff_vs_pyav_of_255"] <= 2 for s in timing)
    ]
    fastest = min(correct, key=lambda d: timing["training_profile"][d]["clip_cpu_ms"]["mean"])
    result = {
        "command": " ".join(
            ["python", "tests/benchmarks/bench_decode.py", *(argv or sys.argv[1:])]
        ),
        "clip": {"num_frames": NUM_FRAMES, "fps": CLIP_FPS, "size": SIZE, "threads": 1},
        "sources": {name: describe(mp4) for name, mp4 in sources.items()},
        "cpu_ms_per_clip": timing,
        "clip_ratio_360p_over_training_profile": {
            d: round(
                timing["360p_default_gop"][d]["clip_cpu_ms"]["mean"]
                / timing["training_profile"][d]["clip_cpu_ms"]["mean"],
                2,
            )
            for d in VIDEO_DECODERS
        },
        "audio_cpu_ms_per_sample": audio,
        "audio_decodes_per_sample": audio_decode_calls(num_batches=16, seed=args.seed),
        "rss": rss,
        "correct_decoders": correct,
        "fastest_correct_on_training_profile": fastest,
        # What data.video_decoder's default (auto) resolves to here: a decoder's name, the key
        # sim_scale.py reads the figures under.
        "default_in_code": resolve_video_decoder(DEFAULT_VIDEO_DECODER),
        "versions": _versions(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "wall_s": round(time.time() - started, 1),
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["clip_ratio_360p_over_training_profile"]), "fastest:", fastest)
    return 0


def _versions() -> dict:
    import decord
    import torchcodec

    return {"torch": torch.__version__, "av": av.__version__, "decord": decord.__version__,
            "torchcodec": torchcodec.__version__}  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
