"""The synthetic corpus: real H.264 + AAC MP4, learnable sync (audio onsets and visual events at
the recorded times), class identities, deterministic bytes, named broken kinds."""

from __future__ import annotations

import io
import json

import av
import decord
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avts_dist.data.probe import probe_media
from avts_dist.data.synthetic import (
    BROKEN_KINDS,
    SHAPES,
    broken_plan,
    class_identity,
    event_times,
    make_clip,
    split_of,
)
from tests.fixtures.corpus import audio_onsets, visual_onset_frames

CLIP = dict(seconds=3.0, fps=10.0, size=32, sample_rate=16000, num_classes=5, seed=7)


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    seconds=st.floats(0.5, 20.0),
    fps=st.sampled_from([5, 8, 25, 29.97, 30]),
)
def test_events_are_on_the_frame_grid_apart_and_inside(seed, seconds, fps):
    times = event_times(np.random.default_rng(seed), seconds, fps)
    frames = np.asarray(times) * fps
    np.testing.assert_allclose(frames, np.round(frames), atol=1e-4)
    assert all(0.1 < t < seconds - 0.1 for t in times)
    assert all(b - a >= 0.5 for a, b in zip(times, times[1:], strict=False))


def test_each_class_has_its_own_identity():
    idents = [class_identity(c, 16, 16000) for c in range(16)]
    pairs = {(i.shape, i.rgb) for i in idents}
    assert len(pairs) == 16 and len({i.pitch_hz for i in idents}) == 16
    assert {i.shape for i in idents} == set(SHAPES)
    for i in idents:  # no aliasing: every harmonic is below Nyquist
        assert i.pitch_hz * len(i.harmonics) < 8000
    assert class_identity(3, 16, 16000) == idents[3]


def test_split_is_deterministic_by_key():
    keys = [f"synth_{i:07d}" for i in range(2000)]
    splits = [split_of(k, 0.2, 0.1) for k in keys]
    assert splits == [split_of(k, 0.2, 0.1) for k in keys]
    share = {s: splits.count(s) / len(keys) for s in ("train", "val", "test")}
    assert abs(share["val"] - 0.2) < 0.04 and abs(share["test"] - 0.1) < 0.03
    assert {split_of(k, 0.0) for k in keys} == {"train"}


def test_broken_plan_names_every_kind():
    plan = broken_plan(8, 0.5, seed=1)
    assert sorted(k for k in plan if k) == sorted(BROKEN_KINDS)
    assert plan == broken_plan(8, 0.5, seed=1)
    assert broken_plan(10, 0.0, seed=1) == [None] * 10
    with pytest.raises(ValueError, match="broken_fraction"):
        broken_plan(4, 1.5, seed=0)


def test_same_seed_same_bytes_other_seed_other_bytes():
    _, a, _ = make_clip(2, **CLIP)
    _, b, _ = make_clip(2, **CLIP)
    _, c, _ = make_clip(2, **{**CLIP, "seed": 8})
    assert a["mp4"] == b["mp4"] and a["json"] == b["json"]
    assert a["mp4"] != c["mp4"]
    assert b"creation_time" not in a["mp4"]


def test_clip_decodes_in_sync_with_decord_and_pyav():
    key, files, meta = make_clip(4, **CLIP)
    mp4, fps, sr = files["mp4"], CLIP["fps"], CLIP["sample_rate"]
    assert json.loads(files["json"]) == meta and meta["key"] == key
    assert len(meta["events"]) >= 2 and meta["broken"] is None
    frame_s = 1.0 / fps

    # decord: frame count, fps, size; mono audio length; onsets and visual events at the events.
    vr = decord.VideoReader(io.BytesIO(mp4))
    assert len(vr) == meta["num_frames"] == 30
    assert vr.get_avg_fps() == pytest.approx(fps)
    frames = vr.get_batch(list(range(len(vr)))).asnumpy()
    assert frames.shape == (30, 32, 32, 3)
    assert visual_onset_frames(frames) == [round(t * fps) for t in meta["events"]]
    ar = decord.AudioReader(io.BytesIO(mp4), sample_rate=sr, mono=True)
    wave = ar[:].asnumpy()[0]
    # AAC codes whole 1024-sample frames: the tail may be padded by less than one frame.
    assert 0 <= len(wave) - meta["duration"] * sr < 1024
    onsets = audio_onsets(wave, sr)
    assert len(onsets) == len(meta["events"])
    np.testing.assert_allclose(onsets, meta["events"], atol=min(frame_s, 0.005))

    # PyAV: stream parameters and the same onsets (the AAC priming is trimmed by the edit list).
    with av.open(io.BytesIO(mp4)) as container:
        v, a = container.streams.video[0], container.streams.audio[0]
        assert (v.codec_context.name, v.codec_context.pix_fmt) == ("h264", "yuv420p")
        assert (a.codec_context.name, a.codec_context.sample_rate, a.codec_context.channels) == (
            "aac",
            sr,
            1,
        )
        pcm = np.concatenate([f.to_ndarray()[0] for f in container.decode(audio=0)])
    np.testing.assert_allclose(audio_onsets(pcm, sr), meta["events"], atol=min(frame_s, 0.005))


def test_identity_shows_in_pixels_and_pitch():
    """Two clips of the same class share colour and pitch; another class differs."""
    clips = {}
    for index in range(12):
        _, files, meta = make_clip(index, **CLIP)
        clips.setdefault(meta["label"], (files["mp4"], meta))
    assert len(clips) >= 2
    pitches = {}
    for label, (mp4, meta) in clips.items():
        with av.open(io.BytesIO(mp4)) as container:
            pcm = np.concatenate([f.to_ndarray()[0] for f in container.decode(audio=0)])
        start = round(meta["events"][0] * 16000)
        seg = pcm[start : start + 2048] * np.hanning(2048)
        spectrum = np.abs(np.fft.rfft(seg))
        pitches[label] = np.argmax(spectrum) * 16000 / 2048
        expected = class_identity(label, CLIP["num_classes"], 16000).pitch_hz
        assert abs(pitches[label] - expected) < 16000 / 2048 * 1.5
    assert len(set(pitches.values())) == len(pitches)


@pytest.mark.parametrize(
    ("kind", "status"),
    [
        ("truncated", "unreadable"),
        ("no_audio", "no_audio"),
        ("too_short", "too_short"),
        ("garbage", "unreadable"),
    ],
)
def test_broken_kinds_are_detected_by_the_probe(kind, status):
    _, files, meta = make_clip(1, broken=kind, **CLIP)
    assert meta["broken"] == kind
    info = probe_media(files["mp4"], min_duration=0.5)
    assert info.status == status
    if kind == "too_short":
        assert info.duration < 0.5 and info.has_audio
    if kind == "no_audio":
        assert info.has_video and not info.has_audio and info.num_frames == 30


@pytest.mark.parametrize("sample_rate", [8000, 16000, 24000, 32000, 44100])
def test_aac_keeps_onsets_sharp_at_every_sample_rate(sample_rate):
    """AAC pre-echo must not move an onset: four clips per rate, each event within 5 ms."""
    for index in range(4):
        _, files, meta = make_clip(
            index, seconds=2.0, fps=25.0, size=16, sample_rate=sample_rate, num_classes=16, seed=5
        )
        with av.open(io.BytesIO(files["mp4"])) as container:
            pcm = np.concatenate([f.to_ndarray()[0] for f in container.decode(audio=0)])
        onsets = audio_onsets(pcm, sample_rate)
        assert len(onsets) == len(meta["events"]), (index, onsets, meta["events"])
        np.testing.assert_allclose(onsets, meta["events"], atol=0.005)
