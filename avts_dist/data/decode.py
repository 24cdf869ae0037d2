"""Decoding clips from bytes in memory, and log-mel spectrograms with plain torch.

- Video: ``num_frames`` frames at ``fps`` starting at ``start_s``, resampled from the source frame
  rate by presentation time (the frame on screen at each target instant, so variable frame rates
  work too), read by torchcodec, PyAV or decord (:mod:`avts_dist.data.frames`); the short side
  resized, then a square crop of ``size`` (random crop and flip for training, centre crop for
  evaluation).
- Audio: the whole track decoded once at ``sample_rate`` (mono) with PyAV (decord's audio reader
  leaks, see :func:`decode_audio`); windows are sliced from it, so a positive and a same-video
  negative cost one audio decode.
- Log-mel: ``torch.stft`` power spectrum and an HTK mel filterbank (no torchaudio).

Every function raises :class:`DecodeError` with a reason (``"decode_error"``, ``"no_video"``,
``"no_audio"``, ``"too_short"``) that the loader counts.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math

import numpy as np
import torch
import torch.nn.functional as F

from avts_dist.config import DataConfig
from avts_dist.data.frames import VIDEO_DECODERS, DecodeError, frame_indices, read_frames

__all__ = [
    "DEFAULT_VIDEO_DECODER",
    "KINETICS_MEAN",
    "KINETICS_STD",
    "VIDEO_DECODERS",
    "DecodeError",
    "audio_window",
    "decode_audio",
    "decode_video",
    "frame_indices",
    "logmel",
    "mel_filterbank",
]

# The normalisation of torchvision's Kinetics video models (r2plus1d_18, mc3_18, r3d_18).
KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)
# The fastest decoder that gives the right frames, measured side by side (docs/benchmarks.md).
DEFAULT_VIDEO_DECODER = DataConfig.video_decoder
# Audio is decoded from this long before a window's start (AAC frames overlap by one frame).
_AUDIO_PREROLL_S = 0.25
# Training crops take the short side from [size, size * (1 + _SCALE_JITTER)].
_SCALE_JITTER = 0.15


def _resize_crop(
    frames_TCHW: torch.Tensor,
    size: int,
    train: bool,
    rng: np.random.Generator | None,
    native_hw: tuple[int, int] | None = None,
) -> torch.Tensor:
    # native_hw: the true frame size when frames were decoded at a distorted width.
    h, w = native_hw or frames_TCHW.shape[-2:]
    short = size
    if train and rng is not None:
        short = int(rng.integers(size, int(math.floor(size * (1 + _SCALE_JITTER))) + 1))
    scale = short / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) != tuple(frames_TCHW.shape[-2:]):
        frames_TCHW = F.interpolate(
            frames_TCHW, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True
        )
    if train and rng is not None:
        top = int(rng.integers(0, new_h - size + 1))
        left = int(rng.integers(0, new_w - size + 1))
        flip = bool(rng.random() < 0.5)
    else:
        top, left, flip = (new_h - size) // 2, (new_w - size) // 2, False
    out = frames_TCHW[:, :, top : top + size, left : left + size]
    return out.flip(-1) if flip else out


def decode_video(
    mp4_bytes: bytes,
    start_s: float,
    num_frames: int,
    fps: float,
    size: int,
    train: bool,
    rng: np.random.Generator | None = None,
    *,
    normalize: bool = True,
    uint8: bool = False,
    num_threads: int = 1,
    decoder: str = DEFAULT_VIDEO_DECODER,
) -> torch.Tensor:
    """A float clip ``[3, T, size, size]`` (Kinetics-normalised unless ``normalize=False``), or
    with ``uint8=True`` the same crop as uint8 ``[3, T, size, size]``, for the device to
    normalise (``avts_dist.train.batch.normalize_video``, the same arithmetic bit for bit).

    ``decoder`` is one of :data:`VIDEO_DECODERS` (``data.video_decoder``); they agree on the
    frames (tests/unit/test_decode.py). ``rng`` drives the training augmentation (scale, crop,
    flip); evaluation ignores it.
    """
    frames_THWC, native_hw = read_frames(
        mp4_bytes, start_s, num_frames, fps, decoder=decoder, num_threads=num_threads
    )
    # Resized as uint8 in the decoder's channels-last layout: torch's vectorised uint8
    # antialias path, 10-18x faster than on float frames (within one level of 255 of it), then
    # only the crop is converted to float.
    frames_TCHW = _resize_crop(frames_THWC.permute(0, 3, 1, 2), size, train, rng, native_hw)
    if uint8:
        return frames_TCHW.permute(1, 0, 2, 3).contiguous()
    frames_TCHW = frames_TCHW.float().div_(255.0)
    if normalize:
        mean = torch.tensor(KINETICS_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(KINETICS_STD).view(1, 3, 1, 1)
        frames_TCHW = (frames_TCHW - mean) / std
    return frames_TCHW.permute(1, 0, 2, 3).contiguous()


def decode_audio(  # noqa: C901 - one pass over the stream: seek, window, resample, errors; split later
    media_bytes: bytes, sample_rate: int, start_s: float = 0.0, end_s: float | None = None
) -> np.ndarray:
    """Audio from ``start_s`` to ``end_s`` (None: the end), mono float32 at ``sample_rate``;
    index 0 is time ``start_s`` of the file.

    Only that span is decoded: the demuxer seeks to ``_AUDIO_PREROLL_S`` before ``start_s``
    (AAC frames overlap, so the first frame after a seek is discarded with the pre-roll) and
    decoding stops past ``end_s``. A 1 s window of a 10 s clip costs a fraction of the track.

    Decoded with PyAV (FFmpeg) rather than decord's ``AudioReader``: decord 0.6 leaks the whole
    decoded track on every reader (about 200 KB per 3 s clip at 16 kHz, measured), which a
    long run cannot afford. Samples are placed by presentation time, so a track that starts
    late is zero-padded and encoder priming (negative timestamps) is dropped.
    """
    import av

    try:
        container = av.open(io.BytesIO(media_bytes), mode="r")
    except Exception as exc:
        raise DecodeError("decode_error", f"cannot open media: {exc}") from None
    chunks: list[np.ndarray] = []
    try:
        if not container.streams.audio:
            raise DecodeError("no_audio", "no audio stream")
        stream = container.streams.audio[0]
        if start_s > _AUDIO_PREROLL_S and stream.time_base is not None:
            target = int((start_s - _AUDIO_PREROLL_S) / stream.time_base)
            with contextlib.suppress(av.error.FFmpegError):
                # A failed seek just decodes from the start.
                container.seek(target, stream=stream, backward=True)
        resampler = None
        first_time: float | None = None
        try:
            for frame in container.decode(stream):
                frame_time = (
                    float(frame.pts * frame.time_base)
                    if frame.pts is not None and frame.time_base is not None
                    else None
                )
                if first_time is None:
                    first_time = frame_time if frame_time is not None else 0.0
                    # Resampling costs as much as decoding: skip it when the track already is
                    # mono float at the target rate (AAC decodes to planar float).
                    direct = (
                        frame.sample_rate == sample_rate
                        and frame.layout.nb_channels == 1
                        and frame.format.name in ("flt", "fltp")
                    )
                    if not direct:
                        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
                if resampler is None:
                    chunks.append(frame.to_ndarray().reshape(-1))
                else:
                    chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(frame))
                if end_s is not None and frame_time is not None and frame_time > end_s + 0.05:
                    break
            else:
                if resampler is not None:
                    chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))
        except DecodeError:
            raise
        except Exception as exc:
            raise DecodeError("no_audio", f"audio decode failed: {exc}") from None
    finally:
        container.close()
    if not chunks:
        raise DecodeError("no_audio", "empty audio track")
    wave = np.concatenate(chunks).astype(np.float32, copy=False)
    # Samples are placed by presentation time: drop what precedes start_s (pre-roll, encoder
    # priming at negative times), zero-pad a track that starts after it.
    offset = int(round((start_s - (first_time or 0.0)) * sample_rate))
    if offset > 0:
        wave = wave[offset:]
    elif offset < 0:
        wave = np.concatenate([np.zeros(-offset, np.float32), wave])
    if end_s is not None:
        wave = wave[: max(0, int(round((end_s - start_s) * sample_rate)))]
    if wave.size == 0:
        raise DecodeError("no_audio", "empty audio track")
    return wave


def audio_window(
    wave: np.ndarray, sample_rate: int, start_s: float, duration_s: float, *, strict: bool = True
) -> np.ndarray:
    """``duration_s`` of audio from ``start_s``; raises ``too_short`` past the end (``strict``)."""
    start = int(round(start_s * sample_rate))
    n = int(round(duration_s * sample_rate))
    if start < 0:
        raise DecodeError("decode_error", f"negative audio start {start_s}")
    out = wave[start : start + n]
    if out.size < n:
        # AAC frames round the track length: tolerate a small tail, zero-padded.
        if strict and n - out.size > max(2048, int(0.05 * sample_rate)):
            raise DecodeError(
                "too_short",
                f"audio window ends at {(start + n) / sample_rate:.3f}s, "
                f"track ends at {wave.size / sample_rate:.3f}s",
            )
        out = np.pad(out, (0, n - out.size))
    return out


def _hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


@functools.lru_cache(maxsize=16)
def mel_filterbank(num_mel_bins: int, n_fft: int, sample_rate: int) -> torch.Tensor:
    """An HTK triangular mel filterbank ``[num_mel_bins, n_fft // 2 + 1]`` from 0 Hz to Nyquist."""
    num_freqs = n_fft // 2 + 1
    freqs = np.linspace(0.0, sample_rate / 2.0, num_freqs)
    mel_pts = np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2.0), num_mel_bins + 2)
    hz_pts = _mel_to_hz(mel_pts)
    fb = np.zeros((num_mel_bins, num_freqs), dtype=np.float64)
    for m in range(num_mel_bins):
        lo, mid, hi = hz_pts[m], hz_pts[m + 1], hz_pts[m + 2]
        up = (freqs - lo) / max(mid - lo, 1e-9)
        down = (hi - freqs) / max(hi - mid, 1e-9)
        fb[m] = np.clip(np.minimum(up, down), 0.0, None)
    return torch.from_numpy(fb).float()


def logmel(
    waveform: np.ndarray | torch.Tensor,
    sample_rate: int,
    num_mel_bins: int = 40,
    win_ms: float = 25.0,
    hop_ms: float = 10.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Log-mel spectrogram ``[1, num_mel_bins, T']`` of a mono waveform (centred frames)."""
    wave = torch.as_tensor(np.asarray(waveform, dtype=np.float32)).reshape(-1)
    win = max(2, int(round(sample_rate * win_ms / 1000.0)))
    hop = max(1, int(round(sample_rate * hop_ms / 1000.0)))
    n_fft = 1 << (win - 1).bit_length()
    if wave.numel() < n_fft // 2 + 1:
        # reflect padding needs more samples than half a window.
        wave = F.pad(wave, (0, n_fft // 2 + 1 - wave.numel()))
    spec = torch.stft(
        wave,
        n_fft=n_fft,
        hop_length=hop,
        win_length=win,
        window=torch.hann_window(win),
        center=True,
        return_complex=True,
    )
    power_FT = spec.abs().pow(2)
    mel_FT = mel_filterbank(num_mel_bins, n_fft, sample_rate) @ power_FT
    return torch.log(mel_FT + eps).unsqueeze(0)
