"""The frames of one window of an MP4 in memory, with one of three decoders (``data.video_decoder``).

Every reader returns the same thing: ``uint8 [T, H, W, 3]`` RGB frames, one per target instant
``start_s + i / fps``, each the source frame on screen at that instant (resampling by
presentation time, so any source frame rate works), plus the picture's true ``(H, W)`` when the
frames come at another width. They raise :class:`DecodeError` with the loader's counter names.

- ``torchcodec`` (FFmpeg through torchcodec): ``get_frames_played_at`` seeks to the keyframe
  before the window and decodes only the frames up to its end. Fastest here
  (docs/benchmarks.md).
- ``pyav`` (FFmpeg through PyAV): the packet index is read by a demux without decoding, then
  decoding starts at the keyframe before the window and stops after its last frame.
- ``decord``: the project's original reader; kept supported. It mis-copies frames of some
  widths, handled below.

One FFmpeg thread each by default: the loader's parallelism is its worker processes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
import torch

from avts_dist.config import VIDEO_DECODERS
from avts_dist.data.decoders import AUTO, FFMPEG_FIX, resolve_video_decoder

__all__ = ["VIDEO_DECODERS", "DecodeError", "frame_indices", "read_frames"]

# Target instants land on exact source frame starts whenever the rates divide; timestamps
# stored as rationals come back a hair early in float, so instants are nudged this far forward.
_EPS_S = 1e-6


class DecodeError(RuntimeError):
    """A clip that cannot be used; ``reason`` is the counter name."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def frame_indices(
    frame_starts_s: np.ndarray, start_s: float, num_frames: int, fps: float
) -> np.ndarray:
    """Source frame on screen at each target instant ``start_s + i / fps``.

    ``frame_starts_s`` are the presentation times of the source frames (sorted). A frame is on
    screen from its start until the next frame starts, so the index is the last frame that
    started at or before the instant; past the end the last frame is held.
    """
    times = _instants(start_s, num_frames, fps)
    idx = np.searchsorted(frame_starts_s, times + _EPS_S, side="right") - 1
    return np.clip(idx, 0, len(frame_starts_s) - 1)


def _instants(start_s: float, num_frames: int, fps: float) -> np.ndarray:
    return start_s + np.arange(num_frames, dtype=np.float64) / fps


def _check_window(start_s: float, num_frames: int, fps: float, video_end_s: float) -> None:
    clip_end = start_s + num_frames / fps
    # Half a target frame of slack: stream durations are rounded by muxers.
    if clip_end > video_end_s + 0.5 / fps:
        raise DecodeError(
            "too_short", f"window ends at {clip_end:.3f}s, video ends at {video_end_s:.3f}s"
        )


# ---- torchcodec ------------------------------------------------------------------------------


def _read_torchcodec(
    mp4_bytes: bytes, start_s: float, num_frames: int, fps: float, num_threads: int
) -> tuple[torch.Tensor, tuple[int, int] | None]:
    try:
        from torchcodec.decoders import VideoDecoder
    except (ImportError, RuntimeError, OSError) as exc:
        raise DecodeError(
            "decode_error",
            f"torchcodec cannot load ({exc.__class__.__name__}): {FFMPEG_FIX}",
        ) from None
    try:
        # "exact" scans the packets (cheap for a clip) and so knows where keyframes are;
        # "approximate" decoded about twice the frames for windows that straddle a keyframe
        # of a long-GOP source, and was slower on the training profile too (measured).
        decoder = VideoDecoder(
            mp4_bytes, dimension_order="NHWC", num_ffmpeg_threads=num_threads, seek_mode="exact"
        )
        meta = decoder.metadata
    except Exception as exc:  # torchcodec raises RuntimeError/ValueError for bad streams
        if "No valid stream" in str(exc) or "video stream" in str(exc):
            raise DecodeError("no_video", f"no video stream: {exc}") from None
        raise DecodeError("decode_error", f"cannot open video stream: {exc}") from None
    first_s = float(meta.begin_stream_seconds or 0.0)
    end_s = meta.end_stream_seconds
    if end_s is None or not meta.num_frames:
        raise DecodeError("no_video", "no video frames")
    end_s = float(end_s)
    _check_window(start_s, num_frames, fps, end_s)
    # Instants before the first frame show the first, past the last one the last (held).
    last_start = end_s - 0.5 / float(meta.average_fps or fps)
    times = np.clip(_instants(start_s, num_frames, fps) + _EPS_S, first_s, last_start)
    try:
        frames_THWC = decoder.get_frames_played_at(times.tolist()).data
    except Exception as exc:
        raise DecodeError("decode_error", f"frame decode failed: {exc}") from None
    return frames_THWC, None


# ---- PyAV ------------------------------------------------------------------------------------


def _read_pyav(
    mp4_bytes: bytes, start_s: float, num_frames: int, fps: float, num_threads: int
) -> tuple[torch.Tensor, tuple[int, int] | None]:
    import av

    try:
        container = av.open(io.BytesIO(mp4_bytes), mode="r")
    except Exception as exc:
        raise DecodeError("decode_error", f"cannot open video stream: {exc}") from None
    try:
        if not container.streams.video:
            raise DecodeError("no_video", "no video stream")
        stream = container.streams.video[0]
        stream.codec_context.thread_count = num_threads
        time_base = float(stream.time_base)
        try:
            # The packet index, without decoding: presentation times and the last frame's end.
            packets = [
                (p.pts, p.duration or 0) for p in container.demux(stream) if p.pts is not None
            ]
        except av.error.FFmpegError as exc:
            raise DecodeError("decode_error", f"cannot demux: {exc}") from None
        if not packets:
            raise DecodeError("no_video", "no video frames")
        pts = np.array(sorted(p for p, _ in packets), dtype=np.int64)
        last_end = max(p + d for p, d in packets)
        _check_window(start_s, num_frames, fps, last_end * time_base)
        want = pts[frame_indices(pts * time_base, start_s, num_frames, fps)].tolist()
        wanted, frames = set(want), {}
        try:
            container.seek(want[0], stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                if frame.pts in wanted and frame.pts not in frames:
                    frames[frame.pts] = frame.to_ndarray(format="rgb24")
                if frame.pts >= want[-1]:
                    break
        except av.error.FFmpegError as exc:
            raise DecodeError("decode_error", f"frame decode failed: {exc}") from None
    finally:
        container.close()
    missing = [p for p in want if p not in frames]
    if missing:
        raise DecodeError("decode_error", f"frames at pts {missing[:3]} did not decode")
    return torch.from_numpy(np.stack([frames[p] for p in want])), None


# ---- decord ----------------------------------------------------------------------------------


def _read_decord(
    mp4_bytes: bytes, start_s: float, num_frames: int, fps: float, num_threads: int
) -> tuple[torch.Tensor, tuple[int, int] | None]:
    import decord

    try:
        vr = decord.VideoReader(io.BytesIO(mp4_bytes), num_threads=num_threads)
    except Exception as exc:  # decord raises DECORDError / RuntimeError for bad streams
        raise DecodeError("decode_error", f"cannot open video stream: {exc}") from None
    try:
        num_src = len(vr)
        if num_src == 0:
            raise DecodeError("no_video", "no video frames")
        starts = vr.get_frame_timestamp(range(num_src))[:, 0].astype(np.float64)
        _check_window(start_s, num_frames, fps, float(vr.get_frame_timestamp(num_src - 1)[1]))
        idx = frame_indices(starts, start_s, num_frames, fps).tolist()
        try:
            return torch.from_numpy(vr.get_batch(idx).asnumpy()), None
        except Exception as exc:
            if "size must exactly match" not in str(exc):
                raise DecodeError("decode_error", f"frame decode failed: {exc}") from None
            return _decord_padded_width(mp4_bytes, vr, idx, num_threads)
    finally:
        # decord keeps large buffers alive until the reader goes: release it promptly.
        del vr


def _decord_padded_width(
    mp4_bytes: bytes, vr, idx: list[int], num_threads: int
) -> tuple[torch.Tensor, tuple[int, int]]:
    """decord 0.6 mis-copies frames of some small widths (16, 24, 48, 72 px: its RGB rows keep
    the decoder's line padding). Decode those scaled to a width that copies cleanly; the caller
    restores the true aspect ratio when it resizes."""
    import decord

    h, w = (int(n) for n in vr[0].shape[:2])
    width = 32 * math.ceil((w + 1) / 32)
    try:
        scaled = decord.VideoReader(
            io.BytesIO(mp4_bytes), num_threads=num_threads, width=width, height=h
        )
        frames = torch.from_numpy(scaled.get_batch(idx).asnumpy())
        del scaled
    except Exception as exc:
        raise DecodeError("decode_error", f"frame decode failed ({w}x{h}): {exc}") from None
    return frames, (h, w)


_READERS: dict[str, Callable[..., tuple[torch.Tensor, tuple[int, int] | None]]] = {
    "torchcodec": _read_torchcodec,
    "pyav": _read_pyav,
    "decord": _read_decord,
}


def read_frames(
    mp4_bytes: bytes,
    start_s: float,
    num_frames: int,
    fps: float,
    *,
    decoder: str,
    num_threads: int = 1,
) -> tuple[torch.Tensor, tuple[int, int] | None]:
    """``(uint8 [T, H, W, 3], true (H, W) or None)`` for the window; see the module doc.
    ``decoder="auto"`` is the one :func:`resolve_video_decoder` picks in this process."""
    if decoder == AUTO:
        decoder = resolve_video_decoder(decoder)
    reader = _READERS.get(decoder)
    if reader is None:
        raise ValueError(f"unknown video decoder {decoder!r}; expected one of {VIDEO_DECODERS}")
    return reader(mp4_bytes, start_s, num_frames, fps, num_threads)
