"""The synthetic corpus's media: frames and waveform of a clip from its events, and their
encoding into a deterministic MP4 (H.264 yuv420p + AAC mono, in memory with PyAV).

Shared by both corpus versions (:mod:`avts_dist.data.synthetic`); re-exported from there.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from fractions import Fraction
from typing import TYPE_CHECKING

import av
import numpy as np

if TYPE_CHECKING:
    from avts_dist.data.synthetic import ClassIdentity

__all__ = [
    "AAC_OPTIONS",
    "X264_OPTIONS",
    "aac_bit_rate",
    "encode_mp4",
    "render_audio",
    "render_video",
    "rgb_to_yuv420p",
]

# Visual event: the object is drawn from the event frame on, fading over this long. No longer
# than the shortest gap between events (gallop: 0.25 s), so two flashes never overlap.
FLASH_SECONDS = 0.25
# Audio event: tone burst with a 2 ms attack (the onset) and an exponential decay.
ATTACK_SECONDS = 0.002
DECAY_SECONDS = 0.06
BURST_SECONDS = 0.25


def _shape_mask(shape: str, size: int, radius: float, cx: float, cy: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx**2 + dy**2 <= radius**2
    if shape == "square":
        return (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    if shape == "triangle":
        return (dy <= radius) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) / 2)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= radius
    if shape == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= radius**2) & (d2 >= (0.55 * radius) ** 2)
    if shape == "cross":
        thin = radius / 3
        box = (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
        return box & ((np.abs(dx) <= thin) | (np.abs(dy) <= thin))
    if shape == "hbar":
        return (np.abs(dx) <= radius) & (np.abs(dy) <= radius / 3)
    return (np.abs(dx) <= radius / 3) & (np.abs(dy) <= radius)  # vbar


def render_video(
    rng: np.random.Generator,
    ident: ClassIdentity,
    events: Sequence[float],
    strengths: Sequence[float],
    num_frames: int,
    fps: float,
    size: int,
) -> np.ndarray:
    """uint8 frames [T, H, W, 3]: a per-video background, the class object at each event, its
    size set by the event's strength. The object stays near one (random) place in a video, as a
    drum does: a net sees the rhythm with local detectors, without relating distant pixels."""
    base = rng.uniform(10, 60, size=3)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)[None, :, None]
    background = base[None, None, :] * (0.7 + 0.3 * ramp)
    frames_THWC = np.broadcast_to(background, (num_frames, size, size, 3)).astype(np.float32)
    color = np.asarray(ident.rgb, dtype=np.float32)
    # Whole frames, rounded down: a flash never reaches the next event (see FLASH_SECONDS).
    flash_frames = max(1, int(FLASH_SECONDS * fps + 1e-6))
    max_radius = size / 6
    margin = 1.5 * max_radius + 1
    cx, cy = rng.uniform(margin, size - margin, size=2)
    for t, strength in zip(events, strengths, strict=True):
        start = round(t * fps)
        # A small shift per event: each onset also shows new pixels, even right after the last.
        dx, dy = rng.uniform(-0.5, 0.5, size=2) * max_radius
        radius = max_radius * (0.7 + 0.3 * strength)
        mask = _shape_mask(ident.shape, size, radius, cx + dx, cy + dy)
        for k in range(flash_frames):
            f = start + k
            if not 0 <= f < num_frames:
                continue
            alpha = 1.0 - k / flash_frames
            frames_THWC[f][mask] = (1 - alpha) * frames_THWC[f][mask] + alpha * color
    return np.clip(frames_THWC, 0, 255).astype(np.uint8)


def render_audio(
    rng: np.random.Generator,
    ident: ClassIdentity,
    events: Sequence[float],
    strengths: Sequence[float],
    num_samples: int,
    sample_rate: int,
) -> np.ndarray:
    """float32 mono waveform: low noise floor plus one tone burst starting at each event, its
    loudness set by the event's strength."""
    wave = (0.003 * rng.standard_normal(num_samples)).astype(np.float32)
    n = int(BURST_SECONDS * sample_rate)
    t = np.arange(n, dtype=np.float32) / sample_rate
    tone = sum(
        a * np.sin(2 * np.pi * ident.pitch_hz * (k + 1) * t) for k, a in enumerate(ident.harmonics)
    )
    tone = tone / sum(ident.harmonics)
    envelope = np.minimum(t / ATTACK_SECONDS, 1.0) * np.exp(-t / DECAY_SECONDS)
    burst = (0.8 * tone * envelope).astype(np.float32)
    for ev, strength in zip(events, strengths, strict=True):
        start = round(ev * sample_rate)
        lo, hi = max(0, start), min(num_samples, start + n)
        if lo < hi:
            wave[lo:hi] += np.float32(0.35 + 0.65 * strength) * burst[lo - start : hi - start]
    return np.clip(wave, -1.0, 1.0)


# FFmpeg's default AAC coder ("twoloop") with perceptual noise substitution smears noise up to
# ~40 ms ahead of some sharp onsets; the "fast" coder keeps every onset within ~2 ms (measured
# over 280 clips at 8-48 kHz), which is what a sync corpus needs.
AAC_OPTIONS = {"aac_coder": "fast"}


def aac_bit_rate(sample_rate: int) -> int:
    """Two bits per sample, 48 kbit/s at least: enough that coding noise stays below onsets."""
    return max(48_000, 2 * sample_rate)


# libx264 options. Same input, same bytes takes two of them beyond one thread:
# - mbtree=0: x264's macroblock-tree rate control reads uninitialised memory in its AVX-512 code
#   at small frame sizes (measured at 16-64 px), so the bytes depended on what the process had
#   allocated before (an S3 client's threads, a process pool); its float code also gives other
#   bytes at other SIMD levels. Without it the bitstream is identical from SSSE3 to AVX-512.
# - input already in yuv420p (rgb_to_yuv420p), so no SIMD colour conversion is involved.
X264_OPTIONS = {
    "preset": "veryfast",
    "crf": "20",
    "threads": "1",
    "g": "16",
    "x264-params": "mbtree=0",
}


def rgb_to_yuv420p(frame_HWC: np.ndarray) -> np.ndarray:
    """BT.601 limited-range yuv420p planes stacked as ``[H * 3 / 2, W]`` uint8 (PyAV's layout).

    Integer arithmetic with fixed rounding, chroma from the mean of each 2x2 block: the same
    bytes on every machine, which swscale's SIMD paths do not promise.
    """
    rgb = frame_HWC.astype(np.int64)
    height, width = rgb.shape[:2]
    quad = rgb.reshape(height // 2, 2, width // 2, 2, 3).sum(axis=(1, 3))
    rgb_2x2 = (quad + 2) >> 2
    # BT.601 coefficients (Y: 65.481, 128.553, 24.966 over 255, ...) in 16-bit fixed point.
    y = ((rgb @ np.array([16829, 33039, 6416]) + 32768) >> 16) + 16
    u = ((rgb_2x2 @ np.array([-9714, -19070, 28784]) + 32768) >> 16) + 128
    v = ((rgb_2x2 @ np.array([28784, -24103, -4681]) + 32768) >> 16) + 128
    planes = np.concatenate([y.ravel(), u.ravel(), v.ravel()]).clip(0, 255).astype(np.uint8)
    return planes.reshape(height * 3 // 2, width)


def encode_mp4(
    frames_THWC: np.ndarray | None, fps: float, waveform: np.ndarray | None, sample_rate: int
) -> bytes:
    """H.264 (libx264, yuv420p) + AAC mono in an MP4, built in memory; deterministic bytes."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        # No creation_time, no encoder version strings that could vary: same input, same bytes.
        container.flags |= av.container.Flags.bitexact.value
        vstream = astream = None
        if frames_THWC is not None:
            vstream = container.add_stream(
                "libx264",
                rate=Fraction(fps).limit_denominator(1001),
                options=dict(X264_OPTIONS),
            )
            vstream.width = frames_THWC.shape[2]
            vstream.height = frames_THWC.shape[1]
            vstream.pix_fmt = "yuv420p"
            vstream.codec_context.thread_count = 1
        if waveform is not None:
            astream = container.add_stream("aac", rate=sample_rate, options=dict(AAC_OPTIONS))
            astream.layout = "mono"
            astream.bit_rate = aac_bit_rate(sample_rate)
            astream.codec_context.thread_count = 1
        if vstream is not None:
            for i, frame_HWC in enumerate(frames_THWC):
                frame = av.VideoFrame.from_ndarray(rgb_to_yuv420p(frame_HWC), format="yuv420p")
                frame.pts = i
                container.mux(vstream.encode(frame))
            container.mux(vstream.encode(None))
        if astream is not None:
            frame_size = 1024
            for start in range(0, len(waveform), frame_size):
                chunk = waveform[start : start + frame_size][None, :]
                frame = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(chunk), format="fltp", layout="mono"
                )
                frame.sample_rate = sample_rate
                frame.pts = start
                frame.time_base = Fraction(1, sample_rate)
                container.mux(astream.encode(frame))
            container.mux(astream.encode(None))
    return buf.getvalue()
