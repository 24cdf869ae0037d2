"""Turning one source file into the bytes a shard stores.

Video sources get one of two profiles (:class:`EncodeProfile`, recorded in the index header):

- ``training`` (the default of ``avts prepare``): MP4 with H.264 (libx264, yuv420p) at short
  side ``short_side`` (never upscaled), a fixed frame rate (``fps``, or the source's capped at
  ``max_fps``), a keyframe every ``keyframe_interval_s`` (no scene-cut keyframes), AAC mono at
  ``sample_rate``, and ``faststart`` (the index, ``moov``, before the media). A loader reaches
  any 1-s window by decoding at most one second of small frames, where a 360p source with a
  keyframe every 250 frames costs many times more (docs/benchmarks.md).
- ``copy``: a source already H.264 + AAC (or silent) in MP4 is stored byte for byte; others
  (UCF101/HMDB51's XviD ``.avi``, ``.webm``/``.mkv`` downloads) are transcoded to H.264/AAC MP4
  at their own size and frame rate, so the loader has one container/codec pair to read.

A clip cut to a listed segment (AudioSet/Kinetics, see :func:`segment_cut`) is transcoded in
either profile: an exact cut needs re-encoding. Frames are chosen by presentation time (the frame
on screen at each output instant) and audio is cut at sample precision at the same instant, so
audio and video stay aligned. A video without an audio track stays without one (flagged
``has_audio=False`` by the shard probe). *Audio-only* sources are stored as PCM WAV: copied byte
for byte when they already are WAV, decoded and re-encoded as 16-bit mono WAV otherwise.
Encoding is single-threaded and bit-exact, so the same source gives the same bytes.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import wave
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from av.video.frame import PictureType

from avts_dist.data.synthetic import AAC_OPTIONS, aac_bit_rate

__all__ = [
    "EncodeProfile",
    "MediaError",
    "audio_to_wav",
    "media_duration",
    "segment_cut",
    "video_to_mp4",
]

# A file at most this much longer than its listed segment is taken as already trimmed
# (downloaders cut at keyframes and round).
TRIM_SLACK_S = 0.5
# Output instants are nudged forward by this much against float error of rational timestamps.
_EPS_S = 1e-6


class MediaError(Exception):
    """A source file that cannot be converted; the message is the skip reason."""


@dataclass(frozen=True)
class EncodeProfile:
    """How ``avts prepare`` stores video; ``header()`` is what the index header records."""

    name: str = "training"  # training | copy
    short_side: int = 128
    fps: float = 0.0  # 0: the source's frame rate, capped at max_fps
    max_fps: float = 30.0
    keyframe_interval_s: float = 1.0
    sample_rate: int = 16000
    crf: int = 23
    preset: str = "veryfast"

    def __post_init__(self) -> None:
        if self.name not in ("training", "copy"):
            raise ValueError(f"profile must be 'training' or 'copy', got {self.name!r}")
        for field_name in ("short_side", "max_fps", "keyframe_interval_s", "sample_rate"):
            if getattr(self, field_name) <= 0:
                raise ValueError(f"{field_name} must be > 0, got {getattr(self, field_name)}")
        if self.short_side % 2:
            raise ValueError(f"short_side must be even (yuv420p), got {self.short_side}")
        if self.fps < 0:
            raise ValueError(f"fps must be >= 0 (0: the source's), got {self.fps}")

    def header(self) -> dict[str, Any]:
        if self.name == "copy":
            return {
                "name": "copy",
                "video": "source bytes if H.264 + AAC MP4, else H.264/AAC MP4 at source size/rate",
            }
        return {
            **asdict(self),
            "container": "mp4",
            "faststart": True,
            "video_codec": "h264",
            "pix_fmt": "yuv420p",
            "audio_codec": "aac",
            "audio_channels": 1,
        }


def _even(n: float) -> int:
    n = round(n)
    return max(2, n - n % 2)


def _open(path: Path) -> av.container.InputContainer:
    try:
        return av.open(str(path))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise MediaError(f"unreadable: {type(exc).__name__}") from None


def media_duration(path: Path) -> float:
    """Seconds, from the container header (the longest stream when it has no duration)."""
    with _open(path) as src:
        if src.duration is not None:
            return src.duration / av.time_base
        ends = [
            float(s.duration * s.time_base)
            for s in src.streams
            if s.duration is not None and s.time_base is not None
        ]
        return max(ends, default=0.0)


def segment_cut(
    duration: float, start: float, end: float, *, named_by_segment: bool
) -> tuple[float, float] | None:
    """Where to cut a file matched to the listed segment ``[start, end]``; None: keep it whole.

    - no longer than the segment (plus :data:`TRIM_SLACK_S`): already trimmed;
    - long enough to hold the segment at its listed time: an untrimmed download, cut it;
    - longer than the segment but ending before it: trimmed, when its name gives the segment
      (a downloader's loose cut); an id-only match is cut at the listed start to its end, or
      skipped (``segment_past_end``) when the file ends before the segment starts.
    """
    if duration <= (end - start) + TRIM_SLACK_S:
        return None
    if duration >= end - TRIM_SLACK_S:
        return start, end
    if named_by_segment:
        return None
    if start >= duration - TRIM_SLACK_S:
        raise MediaError(f"segment_past_end: segment starts at {start:g}s, file is {duration:.2f}s")
    return start, duration


def video_to_mp4(
    path: Path,
    profile: EncodeProfile,
    *,
    start_s: float | None = None,
    end_s: float | None = None,
) -> tuple[bytes, bool]:
    """Returns ``(mp4_bytes, has_audio)`` for ``profile``; ``start_s``/``end_s`` cut a segment."""
    with _open(path) as src:
        if not src.streams.video:
            raise MediaError("no_video")
        v_in = src.streams.video[0]
        a_in = src.streams.audio[0] if src.streams.audio else None
        cut = start_s is not None or end_s is not None
        rate = Fraction(v_in.average_rate or v_in.guessed_rate or 25).limit_denominator(1001)
        w, h = v_in.codec_context.width, v_in.codec_context.height
        if profile.name == "copy":
            if (
                not cut
                and path.suffix.lower() == ".mp4"
                and v_in.codec_context.name == "h264"
                and (a_in is None or a_in.codec_context.name == "aac")
            ):
                return path.read_bytes(), a_in is not None
            size, keyint = (_even(w), _even(h)), None
            sample_rate = (a_in.codec_context.sample_rate or 44100) if a_in else 0
        else:
            if profile.fps:
                rate = Fraction(profile.fps).limit_denominator(1001)
            elif rate > profile.max_fps:
                rate = Fraction(profile.max_fps).limit_denominator(1001)
            scale = min(1.0, profile.short_side / min(w, h))  # never upscaled
            size = (_even(w * scale), _even(h * scale))
            keyint = max(1, round(float(rate) * profile.keyframe_interval_s))
            sample_rate = profile.sample_rate
        encoder = _Encoder(size, rate, keyint, sample_rate if a_in else 0, profile)
        return encoder.run(src, v_in, a_in, start_s or 0.0, end_s)


class _Encoder:
    """One transcode: frames picked by presentation time, audio cut at the same instants."""

    def __init__(self, size, rate: Fraction, keyint, sample_rate: int, profile: EncodeProfile):
        self.width, self.height = size
        self.rate = rate
        self.keyint = keyint
        self.sample_rate = sample_rate
        self.profile = profile

    def _open_output(self, path: str):
        # faststart rewrites the file to move the index first: FFmpeg needs a real file for it.
        out = av.open(path, mode="w", format="mp4", options={"movflags": "+faststart"})
        # No creation_time or encoder version strings: same source, same bytes.
        out.flags |= av.container.Flags.bitexact.value
        v_out = out.add_stream("libx264", rate=self.rate)
        v_out.width, v_out.height, v_out.pix_fmt = self.width, self.height, "yuv420p"
        # threads=1 keeps x264 deterministic and leaves the cores to the process pool.
        options = {"crf": str(self.profile.crf), "preset": self.profile.preset, "threads": "1"}
        if self.keyint:
            options["x264-params"] = f"keyint={self.keyint}:min-keyint={self.keyint}:scenecut=0"
        v_out.options = options
        a_out = None
        if self.sample_rate:
            a_out = out.add_stream("aac", rate=self.sample_rate, options=dict(AAC_OPTIONS))
            a_out.layout = "mono"
            a_out.bit_rate = aac_bit_rate(self.sample_rate)
        return out, v_out, a_out

    def run(self, src, v_in, a_in, lo: float, hi: float | None) -> tuple[bytes, bool]:
        hi = float("inf") if hi is None else hi
        if lo > 1.0:
            # An untrimmed source: start decoding at the keyframe before the segment.
            with contextlib.suppress(av.error.FFmpegError):  # else decode from the start
                src.seek(int((lo - 1.0) * av.time_base), backward=True)
        with tempfile.TemporaryDirectory(prefix="avts-mp4-") as tmp:
            path = os.path.join(tmp, "clip.mp4")
            out, v_out, a_out = self._open_output(path)
            try:
                num_frames, audio = self._video_and_audio(src, v_in, a_in, out, v_out, lo, hi)
                if num_frames == 0:
                    raise MediaError("no_video_frames")
                if a_out is not None and audio is not None:
                    self._encode_audio(out, a_out, audio, lo, num_frames / float(self.rate))
            except av.error.FFmpegError as exc:
                raise MediaError(f"unreadable: {type(exc).__name__}") from None
            finally:
                out.close()
            with open(path, "rb") as f:
                return f.read(), a_out is not None and audio is not None

    def _video_and_audio(self, src, v_in, a_in, out, v_out, lo, hi):
        """Encodes the video; returns (frames written, (first audio time, samples) or None)."""
        step = 1.0 / float(self.rate)
        resampler = None
        if a_in is not None:
            resampler = av.AudioResampler(format="fltp", layout="mono", rate=self.sample_rate)
        audio_t0, chunks, audio_done = None, [], a_in is None
        num_out, prev, prev_t = 0, None, None
        src_step = 1.0 / float(v_in.average_rate or self.rate)

        def emit(frame, until: float) -> None:
            # Every output instant before ``until`` shows ``frame``.
            nonlocal num_out
            while lo + num_out * step < min(until, hi) - _EPS_S:
                img = frame.reformat(
                    width=self.width, height=self.height, format="yuv420p", interpolation="AREA"
                )
                img.pts, img.time_base = num_out, Fraction(1) / self.rate
                # libx264 honours a decoded frame's picture type: a source's I-frames would
                # become extra keyframes, breaking the fixed keyframe interval.
                img.pict_type = PictureType.NONE
                out.mux(v_out.encode(img))
                num_out += 1

        streams = [v_in] + ([a_in] if a_in is not None else [])
        for frame in src.decode(*streams):
            t = frame.time if frame.time is not None else 0.0
            if isinstance(frame, av.VideoFrame):
                if prev is not None:
                    emit(prev, t)
                prev, prev_t = frame, t
                if t >= hi and audio_done:
                    break
            elif t >= hi + 0.1:
                audio_done = True
            elif t + frame.samples / frame.sample_rate > lo - 0.1:
                if audio_t0 is None:
                    audio_t0 = t
                chunks.extend(rf.to_ndarray().reshape(-1) for rf in resampler.resample(frame))
        if prev is not None:
            emit(prev, prev_t + src_step)  # the last frame stays on screen for one frame
        out.mux(v_out.encode(None))
        if resampler is not None and chunks:
            chunks.extend(rf.to_ndarray().reshape(-1) for rf in resampler.resample(None))
        if not chunks:
            return num_out, None
        return num_out, (audio_t0, np.concatenate(chunks).astype(np.float32, copy=False))

    def _encode_audio(self, out, a_out, audio, lo: float, video_s: float) -> None:
        t0, samples = audio
        sr = self.sample_rate
        first = round((lo - t0) * sr)  # sample at time lo; negative: the track starts late
        if first < 0:
            samples = np.concatenate([np.zeros(-first, np.float32), samples])
            first = 0
        samples = samples[first : first + round(video_s * sr)]
        frame_size = 1024
        for start in range(0, len(samples), frame_size):
            chunk = np.ascontiguousarray(samples[start : start + frame_size][None, :])
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = sr, start, Fraction(1, sr)
            out.mux(a_out.encode(frame))
        out.mux(a_out.encode(None))


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
