"""The synthetic corpus: real H.264 + AAC MP4, learnable sync (audio onsets and visual events at
the recorded times), two independent label sets (rhythm, appearance), splits that keep the
labelled clips out of pretraining, deterministic bytes, named broken kinds."""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import json
import random

import av
import decord
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chi2_contingency
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from avts_dist.data.decode import decode_video
from avts_dist.data.index import DatasetIndex, read_member
from avts_dist.data.probe import probe_media
from avts_dist.data.synthetic import (
    BROKEN_KINDS,
    RHYTHMS,
    SHAPES,
    broken_plan,
    class_identity,
    encode_mp4,
    label_plan,
    make_clip,
    render_video,
    rgb_to_yuv420p,
    rhythm_events,
    split_of,
    synthesize,
    use_label_set,
)
from tests.fixtures.corpus import audio_onsets, visual_onset_frames

CLIP = dict(seconds=3.0, fps=10.0, size=32, sample_rate=16000, num_classes=5, seed=7)
GAP_FRAMES_AT_8_FPS = {name: round(delay * 8) for name, delay in RHYTHMS.items()}  # 4, 3, 2


# ---- events and labels -----------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    seconds=st.floats(0.5, 12.0),
    fps=st.sampled_from([8, 10, 24, 25, 30]),
    rhythm=st.integers(0, len(RHYTHMS) - 1),
)
def test_events_follow_the_rhythm_on_the_frame_grid(seed, seconds, fps, rhythm):
    times, strengths = rhythm_events(np.random.default_rng(seed), rhythm, seconds, fps)
    frames = np.round(np.asarray(times) * fps).astype(int)
    np.testing.assert_allclose(np.asarray(times) * fps, frames, atol=1e-4)
    assert len(strengths) == len(times) and all(0 <= s <= 1 for s in strengths)
    assert times[0] < 0 and times[-1] < seconds  # the bar before t = 0 is part of the train
    gaps = np.diff(frames)
    delay = list(RHYTHMS.values())[rhythm]
    # Alternating gaps: the class delay, then the rest of the bar (exact in frames at 8 and 24).
    assert set(gaps[::2].tolist()) | set(gaps[1::2].tolist()) <= {
        round(delay * fps) + d for d in (-1, 0, 1)
    } | {round((1 - delay) * fps) + d for d in (-1, 0, 1)}
    # No two flashes overlap (the flash lasts floor(0.25 fps) frames).
    assert gaps.min() >= int(0.25 * fps + 1e-6)
    bar = round(fps)
    if fps in (8, 24):  # bars of whole frames: every one-bar window holds exactly two events
        for start in range(frames[0], frames[-1] - bar + 1):
            assert ((frames >= start) & (frames < start + bar)).sum() == 2


def test_label_plan_is_balanced_independent_and_prefix_stable():
    keys = [f"synth_{i:07d}" for i in range(3000)]
    splits = [split_of(k, 0.2, 0.0, 0.15, 0.15) for k in keys]
    rhythm, appearance = label_plan(splits, num_appearances=4, seed=3)
    splits_arr = np.asarray(splits)
    for split in ("train", "val", "eval_train", "eval_test"):
        in_split = splits_arr == split
        counts = np.bincount(rhythm[in_split], minlength=3)
        assert counts.max() - counts.min() <= 1, (split, counts)
        for r in range(3):
            group = np.bincount(appearance[in_split & (rhythm == r)], minlength=4)
            assert group.max() - group.min() <= 1, (split, r, group)
    table = np.array(
        [[np.sum((rhythm == r) & (appearance == a)) for a in range(4)] for r in range(3)]
    )
    assert chi2_contingency(table).pvalue > 0.99  # balanced by design, not by luck
    head = label_plan(splits[:1000], num_appearances=4, seed=3)
    np.testing.assert_array_equal(head[0], rhythm[:1000])
    np.testing.assert_array_equal(head[1], appearance[:1000])
    other = label_plan(splits, num_appearances=4, seed=4)
    assert (other[0] != rhythm).mean() > 0.3  # the seed matters


def test_split_is_deterministic_by_key_and_keeps_eval_clips_apart():
    keys = [f"synth_{i:07d}" for i in range(4000)]
    splits = [split_of(k, 0.2, 0.1, 0.15, 0.15) for k in keys]
    assert splits == [split_of(k, 0.2, 0.1, 0.15, 0.15) for k in keys]
    share = {s: splits.count(s) / len(keys) for s in set(splits)}
    expected = {"val": 0.2, "test": 0.1, "eval_train": 0.15, "eval_test": 0.15, "train": 0.4}
    assert share.keys() == expected.keys()
    for name, want in expected.items():
        assert abs(share[name] - want) < 0.03, (name, share[name])
    assert {split_of(k, 0.0) for k in keys} == {"train"}
    # Adding a labelled pool only moves clips out of train: val and test stay what they were.
    before = [split_of(k, 0.2, 0.1) for k in keys]
    assert all(b == a for b, a in zip(before, splits, strict=True) if b in ("val", "test"))


def test_each_appearance_class_has_its_own_identity():
    idents = [class_identity(c, 16, 16000) for c in range(16)]
    pairs = {(i.shape, i.rgb) for i in idents}
    assert len(pairs) == 16 and len({i.pitch_hz for i in idents}) == 16
    assert {i.shape for i in idents} == set(SHAPES)
    for i in idents:  # no aliasing: every harmonic is below Nyquist
        assert i.pitch_hz * len(i.harmonics) < 8000
    assert class_identity(3, 16, 16000) == idents[3]


def test_broken_plan_names_every_kind():
    plan = broken_plan(8, 0.5, seed=1)
    assert sorted(k for k in plan if k) == sorted(BROKEN_KINDS)
    assert plan == broken_plan(8, 0.5, seed=1)
    assert broken_plan(10, 0.0, seed=1) == [None] * 10
    with pytest.raises(ValueError, match="broken_fraction"):
        broken_plan(4, 1.5, seed=0)


# ---- the rhythm task on a generated corpus ---------------------------------------------------


@pytest.fixture(scope="module")
def rhythm_corpus(tmp_path_factory) -> DatasetIndex:
    """60 clips of 3 s, real MP4, with a labelled pool (the eval uses 8 frames at 8 fps)."""
    url = str(tmp_path_factory.mktemp("rhythm") / "ds")
    return synthesize(
        url,
        num_videos=60,
        seconds=3.0,
        fps=8.0,
        size=32,
        sample_rate=8000,
        num_classes=3,
        shard_size=30,
        seed=11,
        val_fraction=0.2,
        eval_train_fraction=0.2,
        eval_test_fraction=0.2,
    )


def _metas(idx: DatasetIndex) -> list[dict]:
    fs = idx.open_fs()
    return [json.loads(read_member(fs, idx, row, "json")) for row in range(len(idx))]


def test_corpus_records_both_label_sets_and_disjoint_splits(rhythm_corpus):
    idx = rhythm_corpus
    metas = _metas(idx)
    assert idx.classes == list(RHYTHMS)
    assert idx.label.tolist() == [m["rhythm"] for m in metas] == idx.column("label_rhythm").tolist()
    assert idx.column("label_appearance").tolist() == [m["appearance"] for m in metas]
    assert set(idx.splits) == {"train", "val", "eval_train", "eval_test"}
    pretrain = set(idx.rows("train").tolist()) | set(idx.rows("val").tolist())
    labelled = set(idx.rows("eval_train").tolist()) | set(idx.rows("eval_test").tolist())
    assert pretrain and labelled and not pretrain & labelled
    assert len(pretrain | labelled) == len(idx)
    by_appearance = use_label_set(idx, "appearance")
    assert by_appearance.label.tolist() == idx.column("label_appearance").tolist()
    assert by_appearance.classes == [class_identity(c, 3).name for c in range(3)]
    assert by_appearance.key.tolist() == idx.key.tolist() and idx.classes == list(RHYTHMS)
    with pytest.raises(ValueError, match="no label set 'colour'"):
        use_label_set(idx, "colour")


def test_nuisance_factors_are_independent_of_the_rhythm(rhythm_corpus):
    """Appearance (shape, colour, pitch, timbre), event strengths, background and phase: a
    chi-square test of independence from the rhythm class on the generated corpus."""
    metas = _metas(rhythm_corpus)
    rhythm = np.array([m["rhythm"] for m in metas])
    assert np.bincount(rhythm).max() - np.bincount(rhythm).min() <= 3  # balanced per split
    nuisances = {
        "appearance": np.array([m["appearance"] for m in metas]),
        "mean strength": np.array([np.mean(m["event_strengths"]) for m in metas]),
        "phase": np.array([m["phase"] for m in metas]),
        "num events": np.array([len(m["events"]) for m in metas]),
    }
    frames = [
        decord.VideoReader(
            io.BytesIO(read_member(rhythm_corpus.open_fs(), rhythm_corpus, r, "mp4"))
        )
        for r in range(len(metas))
    ]
    nuisances["background"] = np.array([np.median(vr[0].asnumpy()) for vr in frames])
    for name, values in nuisances.items():
        # Tertiles for continuous factors; categories as they are.
        levels = np.unique(values)
        if levels.size > 4:
            values = np.digitize(values, np.quantile(values, [1 / 3, 2 / 3]))
            levels = np.unique(values)
        table = np.array(
            [[np.sum((rhythm == r) & (values == v)) for v in levels] for r in range(3)]
        )
        if levels.size > 1:
            assert chi2_contingency(table).pvalue > 0.01, (name, table)


def _windows(idx: DatasetIndex, per_clip: int, seed: int):
    """Eval-style windows: 8 frames at 8 fps from a random start, decoded like the eval does."""
    rng = np.random.default_rng(seed)
    fs = idx.open_fs()
    for row in range(len(idx)):
        mp4 = read_member(fs, idx, row, "mp4")
        room = float(idx.duration[row]) - 1.0 - 1e-3
        for _ in range(per_clip):
            clip = decode_video(mp4, rng.uniform(0, room), 8, 8.0, 32, train=False, normalize=False)
            yield row, (clip.permute(1, 2, 3, 0).numpy() * 255).astype(np.int64)  # [T, H, W, C]


def _histogram(frames_THWC: np.ndarray) -> np.ndarray:
    return np.concatenate(
        [np.histogram(frames_THWC[..., c], bins=8, range=(0, 256))[0] for c in range(3)]
    ).astype(np.float64)


def _cv_accuracy(x: np.ndarray, y: np.ndarray) -> float:
    clf = LogisticRegression(max_iter=2000, C=1.0)
    return float(cross_val_score(clf, x / (x.std(0) + 1e-9), y, cv=5).mean())


def test_rhythm_shows_in_a_window_not_in_a_frame_or_the_colour_histogram(rhythm_corpus):
    idx = rhythm_corpus
    rows, single, window, gap_rule = [], [], [], []
    gap_to_class = {g: c for c, g in enumerate(GAP_FRAMES_AT_8_FPS.values())}
    gap_to_class |= {8 - g: c for c, g in enumerate(GAP_FRAMES_AT_8_FPS.values())}
    for row, frames in _windows(idx, per_clip=3, seed=0):
        rows.append(row)
        single.append(_histogram(frames[row % 8]))
        window.append(_histogram(frames))
        # The window is one bar: it holds exactly two onsets, and their gap names the rhythm.
        # Frame 0 has no previous frame: when only one onset shows after it, the other is at 0.
        onsets = visual_onset_frames(frames)
        onsets = [0, *onsets] if len(onsets) == 1 else onsets
        gap_rule.append(gap_to_class.get(onsets[1] - onsets[0], -1) if len(onsets) == 2 else -1)
    rows = np.asarray(rows)
    rhythm = idx.label[rows]
    appearance = idx.column("label_appearance")[rows]
    chance = 1 / 3
    assert np.mean(np.asarray(gap_rule) == rhythm) >= 0.95
    assert _cv_accuracy(np.asarray(single), rhythm) < chance + 0.15
    assert _cv_accuracy(np.asarray(window), rhythm) < chance + 0.15
    # The same features do find what is in them: the appearance label (the control).
    assert _cv_accuracy(np.asarray(window), appearance) > 0.9


# ---- media --------------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_bytes():
    _, a, _ = make_clip(2, **CLIP)
    _, b, _ = make_clip(2, **CLIP)
    _, c, _ = make_clip(2, **{**CLIP, "seed": 8})
    assert a["mp4"] == b["mp4"] and a["json"] == b["json"]
    assert a["mp4"] != c["mp4"]
    assert b"creation_time" not in a["mp4"]
    # The label set only names the label; the media and the recorded labels are the same.
    _, d, meta = make_clip(2, label_set="appearance", **CLIP)
    assert d["mp4"] == a["mp4"] and meta["label"] == meta["appearance"]


def _dirty_heap(seed: int) -> None:
    """Leaves seeded garbage in freed heap blocks, as other work in the process would."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.posix_memalign.argtypes = [
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.c_size_t,
        ctypes.c_size_t,
    ]
    libc.free.argtypes = [ctypes.c_void_p]
    draw = random.Random(seed)
    blocks = []
    for _ in range(300):
        size = draw.choice([64, 512, 2048, 8192, 20000, 60000])
        block = ctypes.c_void_p()
        libc.posix_memalign(ctypes.byref(block), 64, size)
        ctypes.memset(block, draw.randrange(256), size)
        blocks.append(block)
    for block in blocks:
        libc.free(block)


def test_video_bytes_do_not_depend_on_what_the_process_did_before():
    """x264's macroblock-tree AVX-512 code read uninitialised memory at small frame sizes: the
    same clip encoded after other work (an S3 client, a process pool) gave other bytes. With the
    encoder options of ``encode_mp4`` it no longer does."""
    rng = np.random.default_rng(0)
    times, strengths = rhythm_events(rng, 2, 4.0, 8.0)
    frames = render_video(rng, class_identity(1, 4), times, strengths, 32, 8.0, 16)
    variants = set()
    for rep in range(40):
        _dirty_heap(rep)
        variants.add(encode_mp4(frames, 8.0, None, 16000))
    assert len(variants) == 1


def test_rgb_to_yuv420p_is_the_bt601_conversion_decoders_assume():
    red = np.zeros((2, 2, 3), dtype=np.uint8)
    red[..., 0] = 255
    assert rgb_to_yuv420p(red).ravel().tolist() == [81, 81, 81, 81, 90, 240]  # Y, Cb, Cr
    # Round trip through x264 and decord: flat colours come back within a few levels.
    colours = np.array([[200, 30, 40], [20, 180, 60], [40, 50, 230], [128, 128, 128]])
    frame = np.zeros((32, 32, 3), dtype=np.uint8)
    for i, colour in enumerate(colours):
        frame[16 * (i // 2) : 16 * (i // 2 + 1), 16 * (i % 2) : 16 * (i % 2 + 1)] = colour
    mp4 = encode_mp4(np.stack([frame] * 4), 8.0, None, 16000)
    decoded = decord.VideoReader(io.BytesIO(mp4))[0].asnumpy().astype(int)
    for i, colour in enumerate(colours):
        y, x = 16 * (i // 2) + 8, 16 * (i % 2) + 8
        assert np.abs(decoded[y - 4 : y + 4, x - 4 : x + 4] - colour).max() <= 4, colour


def test_clip_decodes_in_sync_with_decord_and_pyav():
    key, files, meta = make_clip(4, **CLIP)
    mp4, fps, sr = files["mp4"], CLIP["fps"], CLIP["sample_rate"]
    assert json.loads(files["json"]) == meta and meta["key"] == key
    assert len(meta["events"]) >= 5 and meta["broken"] is None
    assert meta["class_name"] == meta["rhythm_name"] == list(RHYTHMS)[meta["rhythm"]]
    frame_s = 1.0 / fps

    # decord: frame count, fps, size; mono audio length; onsets and visual events at the events.
    vr = decord.VideoReader(io.BytesIO(mp4))
    assert len(vr) == meta["num_frames"] == 30
    assert vr.get_avg_fps() == pytest.approx(fps)
    frames = vr.get_batch(list(range(len(vr)))).asnumpy()
    assert frames.shape == (30, 32, 32, 3)
    assert visual_onset_frames(frames) == [round(t * fps) for t in meta["events"] if t * fps >= 1]
    ar = decord.AudioReader(io.BytesIO(mp4), sample_rate=sr, mono=True)
    wave = ar[:].asnumpy()[0]
    # AAC codes whole 1024-sample frames: the tail may be padded by less than one frame.
    assert 0 <= len(wave) - meta["duration"] * sr < 1024
    events = [t for t in meta["events"] if t >= 0.02]
    onsets = [t for t in audio_onsets(wave, sr, hold_s=0.2) if t >= 0.02]
    assert len(onsets) == len(events)
    np.testing.assert_allclose(onsets, events, atol=min(frame_s, 0.005))

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
    onsets = [t for t in audio_onsets(pcm, sr, hold_s=0.2) if t >= 0.02]
    np.testing.assert_allclose(onsets, events, atol=min(frame_s, 0.005))


def test_event_strength_sets_loudness_and_size():
    """The per-event strength shows in both streams (what a hard negative must match)."""
    _, files, meta = make_clip(1, **{**CLIP, "seconds": 4.0})
    with av.open(io.BytesIO(files["mp4"])) as container:
        pcm = np.concatenate([f.to_ndarray()[0] for f in container.decode(audio=0)])
    vr = decord.VideoReader(io.BytesIO(files["mp4"]))
    frames = vr.get_batch(list(range(len(vr)))).asnumpy()
    sr, fps = CLIP["sample_rate"], CLIP["fps"]
    peaks, areas = [], []
    for t in meta["events"]:
        peaks.append(np.abs(pcm[round(t * sr) : round((t + 0.05) * sr)]).max())
        frame = frames[round(t * fps)].astype(int)
        areas.append(int((np.abs(frame - np.median(frame, axis=(0, 1))).max(axis=2) > 60).sum()))
    strengths = np.asarray(meta["event_strengths"])
    assert np.corrcoef(strengths, peaks)[0, 1] > 0.95
    assert np.corrcoef(strengths, areas)[0, 1] > 0.7


def test_appearance_shows_in_pixels_and_pitch():
    """Two clips of the same appearance share colour and pitch; another class differs."""
    clips = {}
    for index in range(12):
        _, files, meta = make_clip(index, **CLIP)
        clips.setdefault(meta["appearance"], (files["mp4"], meta))
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
        # From 20 ms on: before, the decaying burst of an event before t = 0 may still sound.
        onsets = [t for t in audio_onsets(pcm, sample_rate, hold_s=0.2) if t >= 0.02]
        events = [t for t in meta["events"] if t >= 0.02]
        assert len(onsets) == len(events), (index, onsets, events)
        np.testing.assert_allclose(onsets, events, atol=0.005)
