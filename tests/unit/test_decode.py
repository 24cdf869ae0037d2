"""Decoding from bytes with decord: frame resampling, crops, log-mel, A/V alignment, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avts_dist.data.decode import (
    DecodeError,
    audio_window,
    decode_audio,
    decode_video,
    frame_indices,
    logmel,
    mel_filterbank,
)
from avts_dist.data.synthetic import make_clip

SR = 16000


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


def test_decode_video_shapes_and_determinism(clip24):
    mp4, _ = clip24
    v = decode_video(mp4, 0.4, 8, 8.0, 32, train=False)
    assert v.shape == (3, 8, 32, 32) and v.dtype == torch.float32
    assert torch.equal(v, decode_video(mp4, 0.4, 8, 8.0, 32, train=False))
    a = decode_video(mp4, 0.4, 8, 8.0, 32, train=True, rng=np.random.default_rng(1))
    b = decode_video(mp4, 0.4, 8, 8.0, 32, train=True, rng=np.random.default_rng(1))
    assert torch.equal(a, b)
    # Some seed flips or shifts the crop: training augmentation is not the centre crop.
    outs = [
        decode_video(mp4, 0.4, 8, 8.0, 32, train=True, rng=np.random.default_rng(s))
        for s in range(4)
    ]
    assert any(not torch.equal(o, v) for o in outs)


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


@pytest.mark.parametrize("start", [0.0, 0.37, 0.81, 1.2])
def test_audio_video_alignment_within_one_frame(clip24, start):
    mp4, meta = clip24
    fps, num_frames = 8.0, 12
    clip_s = num_frames / fps
    video = decode_video(mp4, start, num_frames, fps, 32, train=False, normalize=False)
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


def test_broken_bytes_raise_decode_errors(clip24):
    mp4, _ = clip24
    with pytest.raises(DecodeError) as err:
        decode_video(b"\x00" * 4096, 0.0, 8, 8.0, 32, train=False)
    assert err.value.reason == "decode_error"
    with pytest.raises(DecodeError) as err:
        decode_video(mp4, 2.5, 8, 8.0, 32, train=False)  # window ends at 3.5 s > 3 s
    assert err.value.reason == "too_short"
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
