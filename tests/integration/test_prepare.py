"""`avts prepare` on small fixtures in every real layout (generated with PyAV, see
tests/fixtures/layouts.py): shards, index columns, skip reports, resume, S3 output."""

from __future__ import annotations

import contextlib
import io
import json
import tarfile

import numpy as np
import pytest

from avts_dist.cli import main
from avts_dist.data.decode import decode_audio, decode_video
from avts_dist.data.index import DatasetIndex, read_member
from tests.fixtures.layouts import make_esc50, wav_duration


def _index(prepared, name) -> DatasetIndex:
    assert prepared[name]["rc"] == 0, prepared[name]["stdout"]
    return DatasetIndex.load(prepared[name]["url"])


def _report(prepared, name) -> dict:
    return json.loads(prepared[name]["stdout"])


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
