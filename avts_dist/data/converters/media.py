"""Turning one source file into the bytes a shard stores.

Decision (documented in docs/evaluation.md): every *video* source that is not already
H.264 in MP4 (UCF101/HMDB51 ship XviD ``.avi``; Kinetics/AudioSet downloads are often
``.webm``/``.mkv``) is transcoded with PyAV to MP4, H.264 (libx264, yuv420p) + AAC mono, at the
source frame rate and size (optionally capped by ``max_side``). The loader then has exactly one
container/codec pair to decode with decord, and byte-range reads stay small. A video without an
audio track stays a video without one (flagged ``has_audio=False`` by the shard probe).
*Audio-only* sources are stored as PCM WAV: copied byte for byte when they already are WAV,
decoded and re-encoded as 16-bit mono WAV otherwise.
"""

from __future__ import annotations

import io
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

__all__ = ["MediaError", "audio_to_wav", "video_to_mp4"]


class MediaError(Exception):
    """A source file that cannot be converted; the message is the skip reason."""


def _even(n: int) -> int:
    return max(2, n - n % 2)


def _open(path: Path) -> av.container.InputContainer:
    try:
        return av.open(str(path))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise MediaError(f"unreadable: {type(exc).__name__}") from None


def video_to_mp4(
    path: Path,
    *,
    start_s: float | None = None,
    end_s: float | None = None,
    max_side: int = 0,
    crf: int = 23,
) -> tuple[bytes, bool]:
    """Returns ``(mp4_bytes, has_audio)``; a source already H.264/AAC-or-silent MP4 is copied.

    ``start_s``/``end_s`` cut a segment (used for untrimmed Kinetics/AudioSet downloads).
    """
    with _open(path) as src:
        if not src.streams.video:
            raise MediaError("no_video")
        v_in = src.streams.video[0]
        a_in = src.streams.audio[0] if src.streams.audio else None
        trimmed = start_s is None and end_s is None
        audio_ok = a_in is None or a_in.codec_context.name == "aac"
        if (
            trimmed
            and path.suffix.lower() == ".mp4"
            and v_in.codec_context.name == "h264"
            and audio_ok
            and not max_side
        ):
            return path.read_bytes(), a_in is not None
        return _transcode(src, v_in, a_in, start_s, end_s, max_side, crf)


def _transcode(src, v_in, a_in, start_s, end_s, max_side, crf) -> tuple[bytes, bool]:
    rate = v_in.average_rate or v_in.guessed_rate or Fraction(25)
    rate = Fraction(rate).limit_denominator(1001)
    w, h = v_in.codec_context.width, v_in.codec_context.height
    if max_side and max(w, h) > max_side:
        scale = max_side / max(w, h)
        w, h = round(w * scale), round(h * scale)
    w, h = _even(w), _even(h)
    lo = start_s or 0.0
    hi = end_s if end_s is not None else float("inf")

    buf = io.BytesIO()
    out = av.open(buf, mode="w", format="mp4")
    v_out = out.add_stream("libx264", rate=rate)
    v_out.width, v_out.height, v_out.pix_fmt = w, h, "yuv420p"
    # threads=1 keeps x264 deterministic and leaves the cores to the process pool.
    v_out.options = {"crf": str(crf), "preset": "veryfast", "threads": "1"}
    a_out = resampler = None
    if a_in is not None:
        sr = a_in.codec_context.sample_rate or 44100
        a_out = out.add_stream("aac", rate=sr, layout="mono")
        resampler = av.AudioResampler(format="fltp", layout="mono", rate=sr, frame_size=1024)
    num_frames = num_samples = 0
    try:
        streams = [v_in] + ([a_in] if a_in is not None else [])
        for frame in src.decode(*streams):
            t = frame.time if frame.time is not None else 0.0
            if isinstance(frame, av.VideoFrame):
                if not lo <= t < hi:
                    continue
                img = frame.reformat(width=w, height=h, format="yuv420p")
                img.pts = num_frames
                img.time_base = 1 / rate
                out.mux(v_out.encode(img))
                num_frames += 1
            else:
                if t + frame.samples / frame.sample_rate <= lo or t >= hi:
                    continue
                for rf in resampler.resample(frame):
                    rf.pts = num_samples
                    num_samples += rf.samples
                    out.mux(a_out.encode(rf))
        out.mux(v_out.encode(None))
        if a_out is not None:
            for rf in resampler.resample(None):
                rf.pts = num_samples
                num_samples += rf.samples
                out.mux(a_out.encode(rf))
            out.mux(a_out.encode(None))
    except av.error.FFmpegError as exc:
        raise MediaError(f"unreadable: {type(exc).__name__}") from None
    finally:
        out.close()
    if num_frames == 0:
        raise MediaError("no_video_frames")
    return buf.getvalue(), a_out is not None and num_samples > 0


def audio_to_wav(path: Path, *, start_s: float | None = None, end_s: float | None = None) -> bytes:
    """WAV bytes for an audio (or audio-visual) source: PCM WAV is copied, others decoded."""
    if path.suffix.lower() == ".wav" and start_s is None and end_s is None:
        data = path.read_bytes()
        try:
            with wave.open(io.BytesIO(data)) as w:
                if w.getnframes() == 0:
                    raise MediaError("empty_audio")
            return data
        except wave.Error:
            pass  # e.g. float WAV that the stdlib cannot read: decoded below.
        except EOFError:
            raise MediaError("unreadable: truncated") from None
    with _open(path) as src:
        if not src.streams.audio:
            raise MediaError("no_audio")
        a_in = src.streams.audio[0]
        sr = a_in.codec_context.sample_rate or 44100
        resampler = av.AudioResampler(format="s16", layout="mono", rate=sr)
        lo, hi = start_s or 0.0, end_s if end_s is not None else float("inf")
        chunks = []
        try:
            for frame in src.decode(a_in):
                t = frame.time or 0.0
                if t + frame.samples / sr <= lo or t >= hi:
                    continue
                chunks.extend(rf.to_ndarray().reshape(-1) for rf in resampler.resample(frame))
        except av.error.FFmpegError as exc:
            raise MediaError(f"unreadable: {type(exc).__name__}") from None
    if not chunks:
        raise MediaError("empty_audio")
    pcm = np.concatenate(chunks).astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.tobytes())
    return out.getvalue()
