"""Decoding from bytes with each video decoder (torchcodec, PyAV, decord): frame resampling,
crops, log-mel, A/V alignment, errors, and agreement of the decoders on the frames."""

from __future__ import annotations

import io
import sys
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from avts_dist.config import ConfigError, DataConfig
from avts_dist.data.decode import (
    VIDEO_DECODERS,
    DecodeError,
    audio_window,
    decode_audio,
    decode_video,
    frame_indices,
    logmel,
    mel_filterbank,
)
from avts_dist.data.frames import read_frames
from avts_dist.data.synthetic import encode_mp4, make_clip
from avts_dist.train.batch import normalize_video

SR = 16000
# The decoders agree on every RGB frame within this many levels of 255 (measured: identical,
# all three convert FFmpeg's H.264 output with swscale's defaults).
FRAME_TOLERANCE = 2


@pytest.fixture(scope="module")
def clip24():
    """A 3 s synthetic clip at 24 fps (so decoding at 8 fps resamples), with known events."""
    _, files, meta = make_clip(
        3, seconds=3.0, fps=24.0, size=48, sample_rate=SR, num_classes=4, seed=7
    )
    assert len(meta["events"]) >= 2
    return files["mp4"], meta


def test_frame_indices_resample_by_presentation_time():
    starts = np.arange(75) / 25.0  # 3 s at 25 fps
    idx = frame_indices(starts, start_s=0.5, num_frames=8, fps=8.0)
    # Target instant 0.5 + i/8 shows the last source frame started at or before it.
    expected = np.floor((0.5 + np.arange(8) / 8.0) * 25.0 + 1e-6).astype(int)
    np.testing.assert_array_equal(idx, expected)
    # Past the end, the last frame is held.
    assert frame_indices(starts, 2.9, 4, 8.0)[-1] == 74


@pytest.fixture(scope="module")
def long_gop():
    """2 s at 30 fps, 64x48, with libx264's defaults: one keyframe, B-frames (the layout of a
    downloaded source, where a window deep in the clip decodes from the keyframe)."""
    rng = np.random.default_rng(3)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"threads": "1"}
        for i in range(60):
            img = np.full((48, 64, 3), 40, np.float32)
            img[10:30, (2 * i) % 48 : (2 * i) % 48 + 16] = (200, 80, 30)
            img += rng.normal(0, 6, img.shape)
            frame = av.VideoFrame.from_ndarray(np.clip(img, 0, 255).astype(np.uint8), "rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 30)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buf.getvalue()


@pytest.mark.parametrize("decoder", VIDEO_DECODERS)
def test_decode_video_shapes_and_determinism(clip24, decoder):
    mp4, _ = clip24

    def clip(train, seed=None):
        rng = None if seed is None else np.random.default_rng(seed)
        return decode_video(mp4, 0.4, 8, 8.0, 32, train=train, rng=rng, decoder=decoder)

    v = clip(False)
    assert v.shape == (3, 8, 32, 32) and v.dtype == torch.float32
    assert torch.equal(v, clip(False))
    assert torch.equal(clip(True, 1), clip(True, 1))
    # Some seed flips or shifts the crop: training augmentation is not the centre crop.
    assert any(not torch.equal(clip(True, s), v) for s in range(4))


def test_uint8_clip_normalised_on_the_device_is_the_float_clip_bit_for_bit(clip24):
    """The loader sends uint8 and the trainer normalises: the model must see the same numbers."""
    mp4, _ = clip24
    for train in (False, True):
        u8 = decode_video(mp4, 0.4, 8, 8.0, 32, train, np.random.default_rng(3), uint8=True)
        assert u8.dtype == torch.uint8 and u8.shape == (3, 8, 32, 32)
        ref = decode_video(mp4, 0.4, 8, 8.0, 32, train, np.random.default_rng(3))
        assert torch.equal(normalize_video(u8[None], torch.float32)[0], ref)


@pytest.mark.parametrize(
    ("source", "start", "num_frames", "fps"),
    [
        ("clip24", 0.0, 8, 8.0),
        ("clip24", 1.21, 12, 8.0),
        ("clip24", 2.05, 8, 8.0),  # ends in the slack past the last frame: held
        ("long_gop", 0.0, 16, 15.0),
        ("long_gop", 0.9, 16, 15.0),  # deep in the GOP, resampled 30 -> 15 fps
        ("long_gop", 1.3, 10, 30.0),  # every source frame, B-frames included
    ],
)
def test_decoders_agree_on_frames(request, source, start, num_frames, fps):
    mp4 = request.getfixturevalue(source)
    if source == "clip24":
        mp4 = mp4[0]
    frames = {}
    for decoder in VIDEO_DECODERS:
        got, native_hw = read_frames(mp4, start, num_frames, fps, decoder=decoder)
        assert got.dtype == torch.uint8 and got.shape[0] == num_frames
        if native_hw is None:  # decord at a width it mis-copies: compared after resizing below
            frames[decoder] = got.int()
    reference = frames["pyav"]
    for decoder, got in frames.items():
        assert got.shape == reference.shape
        assert (got - reference).abs().max() <= FRAME_TOLERANCE, decoder
    # And the clips the loader gets (resized and cropped): decord's padded widths included.
    clips = {
        d: decode_video(mp4, start, num_frames, fps, 32, False, decoder=d) for d in VIDEO_DECODERS
    }
    for decoder, clip in clips.items():
        assert (clip - clips["pyav"]).abs().mean() < 0.02, decoder


def test_decoder_errors_name_the_key_and_the_fix(clip24, monkeypatch):
    with pytest.raises(ConfigError, match="data.video_decoder"):
        DataConfig(video_decoder="ffmpeg")
    with pytest.raises(ValueError, match="unknown video decoder"):
        decode_video(clip24[0], 0.0, 8, 8.0, 32, False, decoder="ffmpeg")
    # torchcodec without FFmpeg's shared libraries: one clear error, not a loader crash.
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)
    with pytest.raises(DecodeError, match="data.video_decoder=pyav") as err:
        decode_video(clip24[0], 0.0, 8, 8.0, 32, False, decoder="torchcodec")
    assert err.value.reason == "decode_error"


def test_logmel_shape_and_tone_peak():
    fb = mel_filterbank(40, 512, SR)
    assert fb.shape == (40, 257) and (fb.sum(dim=1) > 0).all()
    t = np.arange(SR) / SR
    low = logmel(np.sin(2 * np.pi * 300 * t), SR, 40)
    high = logmel(np.sin(2 * np.pi * 3000 * t), SR, 40)
    assert low.shape == (1, 40, 101)
    # A higher tone peaks in a higher mel bin.
    assert low[0].mean(1).argmax() < high[0].mean(1).argmax()


def _video_onsets(frames_CTHW: torch.Tensor) -> list[int]:
    # A visual event draws the class object: a jump in the frame-to-frame difference.
    diff = (frames_CTHW[:, 1:] - frames_CTHW[:, :-1]).abs().mean(dim=(0, 2, 3))
    return [i + 1 for i in range(len(diff)) if diff[i] > 0.02]


@pytest.mark.parametrize("decoder", VIDEO_DECODERS)
@pytest.mark.parametrize("start", [0.0, 0.37, 0.81, 1.2])
def test_audio_video_alignment_within_one_frame(clip24, start, decoder):
    mp4, meta = clip24
    fps, num_frames = 8.0, 12
    clip_s = num_frames / fps
    video = decode_video(
        mp4, start, num_frames, fps, 32, train=False, normalize=False, decoder=decoder
    )
    wave = audio_window(decode_audio(mp4, SR), SR, start, clip_s)
    onsets = _video_onsets(video)
    checked = 0
    for ev in meta["events"]:
        rel = ev - start
        if not 1.0 / fps < rel < clip_s - 1.0 / fps:
            continue
        # Video: the first target frame at or after the event shows it.
        t_video = start + min(i for i in onsets if start + i / fps >= ev - 1e-6) / fps
        # Audio: the burst's onset (2 ms attack) in the decoded window.
        lo = int(round((rel - 0.05) * SR))
        t_audio = start + (lo + int(np.argmax(np.abs(wave[lo:]) > 0.05))) / SR
        assert abs(t_audio - ev) < 0.005, (t_audio, ev)
        assert abs(t_video - t_audio) <= 1.0 / fps, (t_video, t_audio)
        checked += 1
    assert checked >= 1


@pytest.mark.parametrize("decoder", VIDEO_DECODERS)
def test_broken_bytes_raise_decode_errors(clip24, decoder):
    mp4, _ = clip24
    with pytest.raises(DecodeError) as err:
        decode_video(b"\x00" * 4096, 0.0, 8, 8.0, 32, train=False, decoder=decoder)
    assert err.value.reason == "decode_error"
    with pytest.raises(DecodeError) as err:  # cut short: garbage after the first third
        decode_video(mp4[: len(mp4) // 3], 0.0, 8, 8.0, 32, train=False, decoder=decoder)
    assert err.value.reason in ("decode_error", "too_short")
    with pytest.raises(DecodeError) as err:  # window ends at 3.5 s > 3 s
        decode_video(mp4, 2.5, 8, 8.0, 32, train=False, decoder=decoder)
    assert err.value.reason == "too_short"
    audio_only = encode_mp4(None, 8.0, np.zeros(SR, np.float32), SR)
    with pytest.raises(DecodeError) as err:
        decode_video(audio_only, 0.0, 4, 8.0, 32, train=False, decoder=decoder)
    # decord cannot tell a missing stream from a broken one.
    assert err.value.reason == ("decode_error" if decoder == "decord" else "no_video")
    _, files, _ = make_clip(
        1, seconds=2.0, fps=8.0, size=32, sample_rate=SR, num_classes=2, seed=0, broken="no_audio"
    )
    with pytest.raises(DecodeError) as err:
        decode_audio(files["mp4"], SR)
    assert err.value.reason == "no_audio"
    with pytest.raises(DecodeError) as err:
        audio_window(np.zeros(SR, np.float32), SR, 0.5, 1.0)
    assert err.value.reason == "too_short"


def test_width_decord_miscopies_is_decoded_correctly(clip24):
    """decord 0.6 mis-copies 48-px-wide frames; the workaround must give the true picture."""
    import io

    import av

    mp4, _ = clip24
    with av.open(io.BytesIO(mp4)) as container:
        ref = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    ref_THWC = torch.from_numpy(np.stack(ref)).float() / 255.0
    got = decode_video(mp4, 0.0, 24, 8.0, 48, train=False, normalize=False)
    idx = frame_indices(np.arange(len(ref)) / 24.0, 0.0, 24, 8.0)
    expected = ref_THWC[idx].permute(3, 0, 1, 2)
    assert got.shape == expected.shape
    assert (got - expected).abs().mean() < 0.02


@pytest.mark.parametrize("start", [0.0, 0.3, 1.41])
def test_windowed_audio_decode_matches_the_full_track(clip24, start):
    mp4, _ = clip24
    full = decode_audio(mp4, SR)
    window = decode_audio(mp4, SR, start, start + 1.0)
    lo = int(round(start * SR))
    assert window.shape == (SR,)
    # Seeking re-primes the AAC decoder: equal up to the codec's own noise.
    assert np.abs(window - full[lo : lo + SR]).max() < 0.02
