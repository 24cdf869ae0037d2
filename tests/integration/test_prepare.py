"""`avts prepare` on small fixtures in every real layout (generated with PyAV, see
tests/fixtures/layouts.py): shards, index columns, skip reports, resume, S3 output, the training
profile checked with PyAV, untrimmed downloads cut to their segment, and --copy."""

from __future__ import annotations

import contextlib
import io
import json
import tarfile

import av
import numpy as np
import pytest

from avts_dist.cli import main
from avts_dist.data.converters.media import MediaError, segment_cut
from avts_dist.data.decode import decode_audio, decode_video
from avts_dist.data.index import DatasetIndex, read_member
from tests.fixtures.layouts import (
    audio_onset_s,
    flash_frame,
    make_esc50,
    make_folder,
    wav_duration,
    write_video,
)


def _index(prepared, name) -> DatasetIndex:
    assert prepared[name]["rc"] == 0, prepared[name]["stdout"]
    return DatasetIndex.load(prepared[name]["url"])


def _report(prepared, name) -> dict:
    return json.loads(prepared[name]["stdout"])


def _prepare(*argv) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["prepare", *map(str, argv), "--workers", "1", "--no-progress"])
    assert rc == 0, buf.getvalue()
    return buf.getvalue()


def _streams(mp4: bytes) -> dict:
    """What PyAV reads from one MP4: codecs, size, frame rate, keyframe times, audio, layout."""
    with av.open(io.BytesIO(mp4)) as container:
        video = container.streams.video[0]
        audio = container.streams.audio[0] if container.streams.audio else None
        info = {
            "video": (video.codec_context.name, video.codec_context.pix_fmt),
            "size": (video.codec_context.width, video.codec_context.height),
            "fps": float(video.average_rate),
            "audio": None,
        }
        if audio is not None:
            ctx = audio.codec_context
            info["audio"] = (ctx.name, ctx.sample_rate, ctx.layout.nb_channels)
        keyframes = [p for p in container.demux(video) if p.is_keyframe and p.pts is not None]
        info["keyframes_s"] = sorted(round(float(p.pts * p.time_base), 3) for p in keyframes)
    # faststart: the index (moov) is written before the media (mdat).
    info["faststart"] = 0 <= mp4.find(b"moov") < mp4.find(b"mdat")
    return info


def _frames_and_wave(mp4: bytes) -> tuple[np.ndarray, np.ndarray, float]:
    with av.open(io.BytesIO(mp4)) as container:
        fps = float(container.streams.video[0].average_rate)
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    return frames, decode_audio(mp4, 16000), fps


def test_ucf101_avi_transcoded_splits_and_silent_videos_kept(prepared_datasets, layout_sources):
    idx = _index(prepared_datasets, "ucf101")
    made = layout_sources["ucf101"][1]
    assert len(idx) == made["num_videos"]
    assert idx.classes == made["classes"]
    assert idx.members == ["mp4", "json"]
    # About half of UCF101 has no audio: kept, usable (status ok), flagged.
    assert int((~idx.has_audio.astype(bool)).sum()) == made["num_silent"]
    assert set(idx.status.tolist()) == {"ok"}
    keys = idx.key.tolist()
    for k in (1, 2, 3):
        col = idx.column(f"split{k}")
        for key, value in zip(keys, col, strict=True):
            group = int(key.split("_g")[1][:2])
            assert value == ("test" if group == k else "train"), (key, k, value)
    assert (idx.split == idx.column("split1")).all()
    # The AVI (MPEG-4 part 2 + PCM) became H.264/AAC MP4 that decord decodes.
    fs = idx.open_fs()
    row = int(np.flatnonzero(idx.has_audio.astype(bool))[0])
    data = read_member(fs, idx, row, "mp4")
    assert data[4:8] == b"ftyp"
    clip = decode_video(data, 0.0, 8, 8.0, 32, False)
    assert clip.shape == (3, 8, 32, 32)
    assert decode_audio(data, 16000).size > 16000
    meta = json.loads(read_member(fs, idx, row, "json"))
    assert meta["class_name"] == idx.classes[meta["label"]]
    report = _report(prepared_datasets, "ucf101")
    assert report["skipped"] == {"missing_file": 1, "no_video": 1}
    assert report["num_without_audio"] == made["num_silent"]


def test_hmdb51_split_markers(prepared_datasets, layout_sources):
    idx = _index(prepared_datasets, "hmdb51")
    markers = layout_sources["hmdb51"][1]["markers"]
    names = {"1": "train", "2": "test", "0": "unused"}
    source = idx.column("source")
    assert len(idx) == layout_sources["hmdb51"][1]["num_videos"]
    for k in (1, 2, 3):
        col = idx.column(f"split{k}")
        for src, value in zip(source, col, strict=True):
            cls, name = src.split("/")
            assert value == names[markers[(cls, name, k)]]
    assert {"train", "test", "unused"} <= set(idx.column("split2").tolist())


def test_esc50_audio_only_shards_with_folds(prepared_datasets, layout_sources):
    idx = _index(prepared_datasets, "esc50")
    made = layout_sources["esc50"][1]
    assert len(idx) == made["num_clips"]
    assert idx.members == ["wav", "json"]
    assert idx.classes == made["classes"]
    assert sorted(set(idx.column("fold").tolist())) == [1, 2, 3, 4, 5]
    assert not idx.has_video.astype(bool).any() and idx.has_audio.astype(bool).all()
    # the label is the csv's target, encoded in the ESC-50 file name <fold>-<src>-<take>-<target>
    for src, label in zip(idx.column("source"), idx.label, strict=True):
        assert int(src.split("-")[-1].split(".")[0]) == label
    data = read_member(idx.open_fs(), idx, 0, "wav")
    assert data[:4] == b"RIFF" and wav_duration(data) == pytest.approx(1.0)
    with tarfile.open(idx.member(0, "wav")[0]) as tar:  # shards are plain tar files
        assert any(n.endswith(".wav") for n in tar.getnames())


def test_dcase_folds(prepared_datasets, layout_sources):
    idx = _index(prepared_datasets, "dcase2014")
    made = layout_sources["dcase2014"][1]
    assert len(idx) == made["num_clips"] and idx.classes == made["classes"]
    fold = idx.column("fold")
    for k in range(1, made["folds"] + 1):
        col = idx.column(f"fold{k}")
        assert ((col == "test") == (fold == k)).all()
        assert set(col.tolist()) == {"train", "test"}


def test_audioset_and_kinetics_csv_matching(prepared_datasets, layout_sources):
    aset = _index(prepared_datasets, "audioset")
    assert len(aset) == layout_sources["audioset"][1]["num_clips"]
    assert sorted(aset.classes) == sorted(layout_sources["audioset"][1]["classes"])
    assert all(lab.startswith("/m/") for lab in aset.column("labels"))
    assert _report(prepared_datasets, "audioset")["skipped"] == {"missing_file": 1}

    kin = _index(prepared_datasets, "kinetics")
    assert len(kin) == layout_sources["kinetics"][1]["num_clips"]
    assert set(kin.splits) == {"train", "val"}
    # Pretraining corpora need audio: the silent clip is flagged by the probe.
    assert sorted(kin.status.tolist()).count("no_audio") == 1
    assert kin.classes == layout_sources["kinetics"][1]["classes"]
    # The default profile, recorded in the header; audio-only datasets record theirs.
    for idx in (aset, kin):
        assert idx.profile["name"] == "training" and idx.profile["short_side"] == 128
        fs = idx.open_fs()
        for row in range(len(idx)):
            got = _streams(read_member(fs, idx, row, "mp4"))
            # 32-px sources at 8 or 10 fps: not upscaled, their own rate, a keyframe a second.
            assert got["size"] == (32, 32) and got["fps"] in (8.0, 10.0) and got["faststart"]
            assert idx.fps[row] == got["fps"]
            assert got["keyframes_s"] == [float(t) for t in range(int(idx.duration[row] + 0.5))]
    assert _index(prepared_datasets, "esc50").profile["name"] == "wav"


@pytest.mark.parametrize("name", ["audioset", "kinetics"])
def test_untrimmed_downloads_are_cut_to_their_segment(prepared_datasets, layout_sources, name):
    idx = _index(prepared_datasets, name)
    made = layout_sources[name][1]["untrimmed"]
    start, end = made["segment"]
    fs = idx.open_fs()
    cut_rows = []
    for row in range(len(idx)):
        meta = json.loads(read_member(fs, idx, row, "json"))
        if "cut_s" in meta:
            cut_rows.append(row)
            assert meta["cut_s"] == [start, end]
    # Only the id-only match was cut; the clips named by their segment were kept whole.
    (row,) = cut_rows
    assert idx.column("youtube_id")[row] == made["youtube_id"]
    assert idx.duration[row] == pytest.approx(end - start, abs=0.15)
    frames, wave, fps = _frames_and_wave(read_member(fs, idx, row, "mp4"))
    # The marker sits where it was in the source, relative to the segment's start.
    expected = made["marker_s"] - start
    assert flash_frame(frames) / fps == pytest.approx(expected, abs=1.0 / fps + 1e-6)
    assert audio_onset_s(wave, 16000) == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize(
    ("duration", "named_by_segment", "expected"),
    [
        (10.0, False, None),  # already trimmed
        (10.4, True, None),  # a loose cut, within the slack
        (120.0, False, (30.0, 40.0)),  # the whole video: cut at the listed time
        (120.0, True, (30.0, 40.0)),
        (35.0, False, (30.0, 35.0)),  # ends inside the segment: cut to its end
        (25.0, True, None),  # named by its segment, longer than it: trimmed loosely
    ],
)
def test_segment_cut(duration, named_by_segment, expected):
    assert segment_cut(duration, 30.0, 40.0, named_by_segment=named_by_segment) == expected


def test_segment_past_the_end_of_an_id_only_match_is_skipped():
    with pytest.raises(MediaError, match="segment_past_end"):
        segment_cut(25.0, 30.0, 40.0, named_by_segment=False)


def test_training_profile_checked_with_pyav(tmp_path, capsys):
    src = tmp_path / "src"
    # A 50 fps H.264/AAC source at 44.1 kHz, and an XviD/PCM AVI at 25 fps: both 64x48, 3 s.
    write_video(src / "a" / "fast.mp4", cls=0, seconds=3.0, fps=50, size=48, width=64,
                sample_rate=44100)  # fmt: skip
    write_video(src / "b" / "old.avi", cls=1, seconds=3.0, fps=25, size=48, width=64)
    cases = {
        # Default: never upscaled, the source's rate capped at 30.
        "default": ([], (64, 48), {"fast": 30.0, "old": 25.0}),
        "small": (["--short-side", "24", "--fps", "10"], (32, 24), {"fast": 10.0, "old": 10.0}),
    }
    for name, (argv, size, fps) in cases.items():
        out = tmp_path / name
        _prepare("folder", "--src", src, "--out", out, *argv)
        idx = DatasetIndex.load(str(out))
        assert idx.profile["name"] == "training" and idx.profile["fps"] == (10.0 if argv else 0)
        fs = idx.open_fs()
        for row in range(len(idx)):
            got = _streams(read_member(fs, idx, row, "mp4"))
            stem = idx.column("source")[row].split("/")[1].split(".")[0]
            assert got["video"] == ("h264", "yuv420p") and got["size"] == size
            assert got["fps"] == fps[stem] and idx.fps[row] == pytest.approx(fps[stem])
            assert got["keyframes_s"] == [0.0, 1.0, 2.0]
            assert got["audio"] == ("aac", 16000, 1) and idx.sample_rate[row] == 16000
            assert got["faststart"]
            assert idx.duration[row] == pytest.approx(3.0, abs=0.1)
    assert main(["inspect", str(tmp_path / "small")]) == 0
    assert (
        "profile   training: H264 yuv420p, short side 24 (never upscaled), 10 fps, a keyframe "
        "every 1 s, AAC mono 16000 Hz, faststart"
    ) in capsys.readouterr().out


def test_copy_keeps_sources_untouched(tmp_path, capsys):
    make_folder(tmp_path / "src", clips=1)
    _prepare("folder", "--src", tmp_path / "src", "--out", tmp_path / "out", "--copy")
    idx = DatasetIndex.load(str(tmp_path / "out"))
    assert idx.profile["name"] == "copy"
    fs = idx.open_fs()
    for row, source in enumerate(idx.column("source")):
        assert read_member(fs, idx, row, "mp4") == (tmp_path / "src" / source).read_bytes()
    assert main(["inspect", str(tmp_path / "out"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["profile"]["name"] == "copy"


def test_bad_profile_is_a_one_line_error(tmp_path, capsys):
    make_folder(tmp_path / "src", clips=1)
    argv = ["prepare", "folder", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "o")]
    assert main([*argv, "--short-side", "33"]) == 2
    err = capsys.readouterr().err
    assert "short-side must be even" in err and err.count("\n") == 1


def test_folder_layout(prepared_datasets):
    idx = _index(prepared_datasets, "folder")
    assert idx.classes == ["cats", "dogs"] and len(idx) == 4
    assert _report(prepared_datasets, "folder")["skipped"] == {"not_media": 1}


def test_resume_reuses_finished_chunks(layout_sources, tmp_path):
    from avts_dist.data.converters import prepare

    src = layout_sources["ucf101"][0]
    out, work = str(tmp_path / "ucf"), tmp_path / "work"
    # Two worker processes (spawned) convert the chunks in parallel.
    first = prepare(
        "ucf101", src, out, chunk_size=4, work_dir=work, keep_work=True, progress=False, workers=2
    )
    keys = DatasetIndex.load(out).key.tolist()
    # An interrupted run: the last chunk never finished (its manifest is written last).
    parts = sorted(work.glob("part-*.json"))
    parts[-1].unlink()
    second = prepare("ucf101", src, out, chunk_size=4, work_dir=work, progress=False)
    assert second.num_chunks_resumed == first.num_chunks - 1
    assert DatasetIndex.load(out).key.tolist() == keys
    assert not work.exists()  # removed after success


def test_prepare_to_s3(s3_server, s3_bucket, tmp_path):
    src = tmp_path / "esc"
    make_esc50(src, num_classes=2, folds=2)
    url = f"s3://{s3_bucket}/esc50"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(
            [
                "prepare",
                "esc50",
                "--src",
                str(src),
                "--out",
                url,
                "--workers",
                "1",
                "--no-progress",
                "--work-dir",
                str(tmp_path / "w"),
            ]
        )
    assert rc == 0, buf.getvalue()
    idx = DatasetIndex.load(url)
    assert len(idx) == 4
    assert read_member(idx.open_fs(), idx, 1, "wav")[:4] == b"RIFF"


def test_bad_source_is_a_clear_error(tmp_path, capsys):
    assert main(["prepare", "ucf101", "--src", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "UCF-101 video folder not found" in err and "Traceback" not in err
    (tmp_path / "meta").mkdir()
    assert main(["prepare", "esc50", "--src", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "meta/esc50.csv not found" in capsys.readouterr().err


def test_folder_with_split_dirs_and_nested_hmdb(tmp_path):
    from avts_dist.data.converters import prepare
    from tests.fixtures.layouts import make_folder, make_hmdb51

    make_folder(tmp_path / "f" / "train", clips=1)
    make_folder(tmp_path / "f" / "val", clips=1)
    prepare("folder", tmp_path / "f", str(tmp_path / "fo"), progress=False)
    idx = DatasetIndex.load(str(tmp_path / "fo"))
    assert sorted(idx.split.tolist()) == ["train", "train", "val", "val"]
    # HMDB51 as extracted from its rar: videos one level deeper than the split folder.
    made = make_hmdb51(tmp_path / "h" / "hmdb51_org", clips=2)
    (tmp_path / "h" / "hmdb51_org" / "testTrainMulti_7030_splits").rename(
        tmp_path / "h" / "testTrainMulti_7030_splits"
    )
    prepare("hmdb51", tmp_path / "h", str(tmp_path / "ho"), progress=False)
    assert len(DatasetIndex.load(str(tmp_path / "ho"))) == made["num_videos"]
