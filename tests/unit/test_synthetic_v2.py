"""Version 2 of the synthetic corpus: only time ties sound to picture. The audio identity is its
own draw, the bars are jittered with the rhythm classes kept, no shift of the offset grid lines
the events up again (checked by an oracle that sees only event times), and version 1 is what it
was."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chi2_contingency

from avts_dist.data.index import DatasetIndex
from avts_dist.data.synthetic import RHYTHMS, class_identity, make_clip, rhythm_events, synthesize
from avts_dist.data.synthetic_v2 import (
    BAR_MAX_SECONDS,
    BAR_MIN_SECONDS,
    echo_count,
    jittered_events,
    oracle_offset_curve,
    oracle_scores,
)

DELAYS = list(RHYTHMS.values())
GRID = [round(0.1 * k, 6) for k in range(-10, 11)]  # avts eval sync's offset classes
CLIP = dict(seconds=4.0, fps=8.0, size=16, sample_rate=16000, num_classes=4, seed=5)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rhythm=st.integers(0, len(RHYTHMS) - 1))
def test_jittered_bars_keep_the_rhythm_and_leave_no_echo(seed, rhythm):
    times, strengths, echoes = jittered_events(
        np.random.default_rng(seed), DELAYS[rhythm], 4.0, 8.0, DELAYS
    )
    frames = np.round(np.asarray(times) * 8).astype(int)
    assert len(strengths) == len(times) and times[0] < 0 <= times[-1] < 4.0
    # The class: every bar's second event follows its first by the class delay, in frames.
    assert set(np.diff(frames)[::2].tolist()) == {round(DELAYS[rhythm] * 8)}
    bars = np.diff(frames[::2])
    assert bars.min() >= BAR_MIN_SECONDS * 8 and bars.max() <= BAR_MAX_SECONDS * 8
    assert np.diff(frames).min() >= 2  # flashes (0.25 s) never overlap
    # Every one-second window of the clip holds an event (no empty window to confuse).
    assert np.diff(frames[frames >= -8]).max() <= 8
    assert echoes == 0 == echo_count(times, 4.0, 8.0)


def test_bar_lengths_do_not_depend_on_the_class():
    """The same draws give the same bars whatever the delay: bar lengths tell nothing."""
    starts = {
        tuple(jittered_events(np.random.default_rng(11), d, 4.0, 8.0, DELAYS)[0][::2])
        for d in DELAYS
    }
    assert len(starts) == 1


def test_echo_count_finds_the_periodic_corpus():
    """Version 1's one-second bars line up again at 1.0 s and 2.0 s shifts; count them by hand."""
    times = [-0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]  # "even" from phase 0: every 0.5 s
    # 4 s at 8 fps, 8-frame windows: 25 window starts; a shift of k frames has 25 - k pairs,
    # all equal: shifts 0.5, 1.0, 1.5, 2.0 s = 4, 8, 12, 16 frames -> 21 + 17 + 13 + 9.
    assert echo_count(times, 4.0, 8.0) == 60
    assert echo_count(times, 4.0, 8.0, shifts=[0.3]) == 0  # not a whole number of frames


def test_oracle_scores_by_hand():
    times = [0.25, 0.5, 1.25, 2.0]
    # Video window [0, 1): 0.25, 0.5. Audio [0, 1): the same (0). [0.25, 1.25): 0, 0.25 ->
    # 0.25 matches, 0.5 and 0 have no partner (-2). [1.5, 2.5): 0.5 -> the video's 0.25 alone
    # (-1). [2.2, 3.2): empty -> both video events (-2). [0.24, 1.24): 0.01, 0.26 -> within
    # 20 ms of 0.25 is 0.26 only; 0.5 and 0.01 alone (-2).
    scores = oracle_scores(times, 0.0, [0.0, 0.25, 1.5, 2.2, 0.24])
    assert scores.tolist() == pytest.approx([0.0, -2.0, -1.0, -2.0, -2.0])


def test_the_oracle_tells_every_offset_on_version_2_and_not_on_version_1():
    """The sync-against-offset curve of an event-time observer: version 1's periodic bars give
    a whole-bar shift away (a tie with sync, accuracy 0 at 1.0 s, and no offset class can be
    told); version 2 gives every offset of the grid away, in pairs and as a class."""
    v1 = [rhythm_events(np.random.default_rng(i), i % 3, 4.0, 8.0)[0] for i in range(45)]
    v2 = [jittered_events(np.random.default_rng(i), DELAYS[i % 3], 4.0, 8.0, DELAYS)[0] for i in range(45)]  # fmt: skip
    curve1, curve2 = oracle_offset_curve(v1, 4.0, GRID), oracle_offset_curve(v2, 4.0, GRID)
    assert curve1[1.0][0] == 0.0 and curve1[-1.0][0] == 0.0
    assert max(top1 for _, top1 in curve1.values()) == 0.0
    assert all(pair == 1.0 for o, (pair, _) in curve2.items() if o != 0)
    assert all(top1 == 1.0 for _, top1 in curve2.values())


def test_v2_sound_is_drawn_apart_from_the_picture():
    """The audio's pitch is the audio identity's, and that identity is independent of the
    appearance label (chi-square over clip draws); version 1's sound is its appearance."""
    metas = [make_clip(i, **CLIP, version=2, rhythm=i % 3, appearance=(i // 3) % 4)[2] for i in range(48)]  # fmt: skip
    table = np.zeros((4, 4))
    for m in metas:
        table[m["appearance"], m["audio_identity"]] += 1
    assert chi2_contingency(table + 1)[1] > 0.01
    assert sum(m["audio_identity"] != m["appearance"] for m in metas) > 24
    key, files, meta = make_clip(3, **CLIP, version=2, rhythm=0, appearance=0)
    assert meta["version"] == 2 and meta["audio_identity"] != 0  # this draw differs (seeded)
    with av.open(io.BytesIO(files["mp4"])) as container:
        pcm = np.concatenate([f.to_ndarray()[0] for f in container.decode(audio=0)])
    start = round(meta["events"][0] * 16000)
    spectrum = np.abs(np.fft.rfft(pcm[start : start + 2048] * np.hanning(2048)))
    pitch = np.argmax(spectrum) * 16000 / 2048
    expected = class_identity(meta["audio_identity"], 4, 16000).pitch_hz
    assert abs(pitch - expected) < 16000 / 2048 * 1.5
    assert abs(pitch - class_identity(0, 4, 16000).pitch_hz) > 16000 / 2048 * 3


def test_version_1_is_unchanged_and_version_2_is_recorded(tmp_path):
    default = make_clip(2, **CLIP)
    assert default[1] == make_clip(2, **CLIP, version=1)[1]
    assert "version" not in default[2] and "audio_identity" not in default[2]
    kw = dict(num_videos=6, seconds=2.0, fps=8.0, size=16, sample_rate=16000, num_classes=4)
    kw |= dict(shard_size=3, seed=0)
    v1 = synthesize(str(tmp_path / "v1"), **kw)
    v2 = synthesize(str(tmp_path / "v2"), **kw, version=2)
    assert "version" not in v1.header["metadata"]
    assert DatasetIndex.load(str(tmp_path / "v2")).header["metadata"]["version"] == 2
    # Same splits and labels (same plan), other media.
    assert (v1.column("label_rhythm") == v2.column("label_rhythm")).all()
    assert (v1.split == v2.split).all()
    with pytest.raises(ValueError, match="version must be one of"):
        synthesize(str(tmp_path / "v3"), **kw, version=3)
