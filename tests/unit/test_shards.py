"""Tar shards + index.npz: offsets match tarfile, one byte range reads one member, the index is
committed last and atomically, and bad URLs / malformed indexes are clear DatasetErrors."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
import wave
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avts_dist.data.index import (
    FORMAT_VERSION,
    INDEX_NAME,
    DatasetError,
    DatasetIndex,
    read_member,
)
from avts_dist.data.probe import probe_media
from avts_dist.data.writer import ShardWriter
from avts_dist.storage import StorageError, get_fs


def _wav(seconds: float, sample_rate: int = 8000) -> bytes:
    """A real (silent) PCM WAV file: audio-only datasets use <key>.wav members."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(np.zeros(int(seconds * sample_rate), dtype=np.int16).tobytes())
    return buf.getvalue()


def _write(url: str, num_clips: int = 5, shard_size: int = 2) -> DatasetIndex:
    with ShardWriter(url, shard_size=shard_size, classes=["a", "b"], members=("wav", "json")) as w:
        for i in range(num_clips):
            files = {"wav": _wav(0.5 + 0.25 * i), "json": json.dumps({"i": i}).encode()}
            if i == 3:
                files.pop("json")  # a member may be absent
            w.add(
                f"clip_{i}",
                files,
                label=i % 2,
                split="val" if i == 4 else "train",
                tag=f"t{i}",
                w=i / 2,
            )
    return w.close()  # after the with block: the same committed index


@pytest.mark.parametrize("scheme", ["local", "memory"])
def test_round_trip_offsets_match_tarfile(tmp_path, scheme):
    url = str(tmp_path / "ds") if scheme == "local" else f"memory://shards-{os.getpid()}/ds"
    written = _write(url)
    idx = DatasetIndex.load(url)
    assert len(idx) == 5 and idx.shards == written.shards
    assert idx.shards == [f"shards/shard-{i:06d}.tar" for i in range(3)]
    assert idx.key.tolist() == [f"clip_{i}" for i in range(5)]
    assert idx.split.tolist() == ["train"] * 4 + ["val"]
    assert idx.label.tolist() == [0, 1, 0, 1, 0]
    assert idx.classes == ["a", "b"]
    assert idx.status.tolist() == ["ok"] * 5
    assert not idx.has_video.any() and idx.has_audio.all()
    assert idx.sample_rate.tolist() == [8000] * 5
    np.testing.assert_allclose(idx.duration, [0.5, 0.75, 1.0, 1.25, 1.5], atol=1e-3)
    assert idx.column("tag").tolist() == [f"t{i}" for i in range(5)]
    np.testing.assert_allclose(idx.column("w"), [0, 0.5, 1, 1.5, 2])
    fs = idx.open_fs()
    for row in range(5):
        shard_url, offset, size = idx.member(row, "wav")
        with fs.open(fs._strip_protocol(shard_url), "rb") as f, tarfile.open(fileobj=f) as tf:
            info = tf.getmember(f"clip_{row}.wav")
            assert (info.offset_data, info.size) == (offset, size)
            assert read_member(fs, idx, row, "wav") == tf.extractfile(info).read()
    assert json.loads(read_member(fs, idx, 2, "json")) == {"i": 2}
    with pytest.raises(KeyError, match="no .json member"):
        idx.member(3, "json")
    with pytest.raises(KeyError):
        idx.member(0, "mp4")
    assert idx.media_ext(0) == "wav"
    assert idx.row_of("clip_4") == 4


def test_rows_filters_by_split_and_status(tmp_path):
    url = str(tmp_path / "ds")
    with ShardWriter(url, shard_size=4, members=("wav", "mp4", "json")) as w:
        w.add("good", {"wav": _wav(1.0)}, label=0, split="train")
        w.add("bad", {"mp4": b"not a video at all"}, label=1, split="train")
        w.add("short", {"wav": _wav(0.1)}, label=0, split="val")
        w.add("short2", {"wav": _wav(0.1)}, label=0, split="val")
    idx = DatasetIndex.load(url)
    assert idx.status.tolist() == ["ok", "unreadable", "ok", "ok"]
    assert idx.rows().tolist() == [0, 2, 3]
    assert idx.rows(split="train").tolist() == [0]
    assert idx.rows(split="train", status=None).tolist() == [0, 1]
    assert idx.rows(status="unreadable").tolist() == [1]
    assert idx.rows(split="test").dtype == np.int64 and idx.rows(split="test").size == 0
    # A minimum duration marks short media.
    with ShardWriter(url, shard_size=4, members=("wav",), min_duration=0.5) as w:
        w.add("short", {"wav": _wav(0.1)}, label=0, split="val")
    assert DatasetIndex.load(url).status.tolist() == ["too_short"]


def _dataset_files(url: str) -> dict[str, bytes]:
    fs, root = get_fs(url)
    names = [INDEX_NAME, *(f"shards/shard-{i:06d}.tar" for i in range(3))]
    return {name: fs.cat_file(f"{root}/{name}") for name in names}


def _next_zip_second() -> None:
    # Zip timestamps have 2-second resolution: wait until the stamp a write would get changes.
    stamp = int(time.time()) // 2
    while int(time.time()) // 2 == stamp:
        time.sleep(0.05)


@pytest.mark.s3
def test_same_input_same_bytes_at_any_time_on_any_storage(tmp_path, s3_bucket):
    """The flake of issue 11: index.npz carried the wall clock in its zip entries."""
    _write(str(tmp_path / "a"))
    _next_zip_second()
    _write(f"s3://{s3_bucket}/same-bytes")
    _next_zip_second()
    _write(str(tmp_path / "b"))
    local_a = _dataset_files(str(tmp_path / "a"))
    assert _dataset_files(str(tmp_path / "b")) == local_a
    assert _dataset_files(f"s3://{s3_bucket}/same-bytes") == local_a
    assert sorted(os.listdir(tmp_path / "a")) == [INDEX_NAME, "shards"]  # no temporaries left
    # The fixed metadata is what makes it so: every zip entry and tar member is stamped 0.
    with zipfile.ZipFile(io.BytesIO(local_a[INDEX_NAME])) as zf:
        assert {info.date_time for info in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    with tarfile.open(fileobj=io.BytesIO(local_a["shards/shard-000000.tar"])) as tf:
        assert {(m.mtime, m.uid, m.gid, m.mode) for m in tf.getmembers()} == {(0, 0, 0, 0o644)}


def test_index_bytes_do_not_depend_on_column_order(tmp_path):
    idx = _write(str(tmp_path / "ds"))
    shuffled = dict(reversed(list(idx._columns.items())))
    again = DatasetIndex(shuffled, dict(idx.header), idx.url)
    assert again.to_bytes() == idx.to_bytes()
    # A loaded index re-serializes to the committed bytes.
    assert DatasetIndex.load(idx.url).to_bytes() == (tmp_path / "ds" / INDEX_NAME).read_bytes()


def test_crashed_write_leaves_no_index(tmp_path):
    url = str(tmp_path / "ds")
    _write(url)
    assert len(DatasetIndex.load(url)) == 5
    # Rewriting in place: the old index goes first, so a crash mid-write cannot leave an index
    # that describes shards being overwritten.
    with (
        pytest.raises(RuntimeError, match="boom"),
        ShardWriter(url, shard_size=1, members=("wav",)) as w,
    ):
        w.add("x", {"wav": _wav(0.5)}, label=0, split="train")
        w.add("y", {"wav": _wav(0.5)}, label=0, split="train")
        raise RuntimeError("boom")
    with pytest.raises(DatasetError, match="aborted"):
        w.close()
    shards = sorted(os.listdir(tmp_path / "ds" / "shards"))
    assert shards == ["shard-000000.tar", "shard-000001.tar"]  # the old third shard is gone
    with pytest.raises(DatasetError, match="never committed"):
        DatasetIndex.load(url)


def test_writer_rejects_bad_keys_and_columns(tmp_path):
    w = ShardWriter(str(tmp_path / "ds"), shard_size=2, members=("wav",))
    with pytest.raises(DatasetError, match="must match"):
        w.add("a/b", {"wav": _wav(0.5)}, label=0, split="train")
    with pytest.raises(DatasetError, match="not in"):
        w.add("a", {"mp4": b""}, label=0, split="train")
    w.add("a", {"wav": _wav(0.5)}, label=0, split="train", n=1)
    with pytest.raises(DatasetError, match="duplicate"):
        w.add("a", {"wav": _wav(0.5)}, label=0, split="train")
    with pytest.raises(DatasetError, match="mixes"):
        w.add("b", {"wav": _wav(0.5)}, label=0, split="train", n="x")
    with pytest.raises(DatasetError, match="reserved"):
        w.add("c", {"wav": _wav(0.5)}, label=0, split="train", duration=1.0)
    with pytest.raises(DatasetError, match="scalar expected"):
        w.add("c", {"wav": _wav(0.5)}, label=0, split="train", label_name=None)
    assert len(w) == 1 and len(w._tars["train"].getmembers()) == 1  # rejected clips left no trace
    w.abort()


def _write_npz(path, header: dict | None, **columns) -> None:
    arrays = dict(columns)
    if header is not None:
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def test_malformed_index_is_a_clear_error(tmp_path):
    url = str(tmp_path / "ds")
    idx = _write(url)
    path = tmp_path / "ds" / INDEX_NAME
    path.write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="not an npz"):
        DatasetIndex.load(url)
    path.write_bytes(idx.to_bytes()[:200])
    with pytest.raises(DatasetError, match="malformed index"):
        DatasetIndex.load(url)
    _write_npz(path, None, key=np.array([b"a"]))
    with pytest.raises(DatasetError, match="no header"):
        DatasetIndex.load(url)
    _write_npz(path, {"format_version": FORMAT_VERSION + 1}, key=np.array([b"a"]))
    with pytest.raises(DatasetError, match="format_version 2"):
        DatasetIndex.load(url)
    _write_npz(path, dict(idx.header), key=np.array([b"a"]))
    with pytest.raises(DatasetError, match="missing shard"):
        DatasetIndex.load(url)
    cols = dict(idx._columns)
    cols["label"] = cols["label"][:2]
    _write_npz(path, dict(idx.header), **cols)
    with pytest.raises(DatasetError, match="mismatch"):
        DatasetIndex.load(url)
    # An object array would need pickle: refused, not executed.
    cols = dict(idx._columns)
    cols["key"] = np.array(["a"] * 5, dtype=object)
    with open(path, "wb") as f:
        np.savez(f, header=np.frombuffer(json.dumps(idx.header).encode(), np.uint8), **cols)
    with pytest.raises(DatasetError, match="malformed index"):
        DatasetIndex.load(url)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("bogus://x/y", "Protocol not known"),
        ("s3://", "names no bucket"),
        ("/nonexistent/dir/ds", "index.npz not found"),
    ],
)
def test_bad_urls_are_clear_errors(url, message):
    with pytest.raises(DatasetError, match=message) as info:
        DatasetIndex.load(url)
    assert isinstance(info.value, StorageError)


def test_unwritable_destination_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatasetError, match="cannot write dataset"):
        ShardWriter(str(tmp_path / "file" / "ds"), shard_size=1)


@settings(max_examples=40, deadline=None)
@given(
    codes=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2)), min_size=0, max_size=60),
    split=st.sampled_from([None, "train", "val", "test", "nope"]),
    status=st.sampled_from([None, "ok", "no_audio", "unreadable", "nope"]),
)
def test_rows_matches_a_plain_filter_and_survives_serialization(codes, split, status):
    splits, statuses = ["train", "val", "test"], ["ok", "no_audio", "unreadable"]
    n = len(codes)
    columns = {
        "key": np.array([f"k{i}".encode() for i in range(n)], dtype="S8"),
        "shard": np.zeros(n, np.int32),
        "offset": np.arange(2 * n, dtype=np.int64).reshape(n, 2),
        "size": np.ones((n, 2), np.int64),
        "label": np.arange(n, dtype=np.int32),
        "split": np.array([c[0] for c in codes], np.int8),
        "duration": np.ones(n, np.float32),
        "fps": np.ones(n, np.float32),
        "num_frames": np.ones(n, np.int32),
        "has_video": np.ones(n, bool),
        "has_audio": np.ones(n, bool),
        "sample_rate": np.ones(n, np.int32),
        "status": np.array([c[1] for c in codes], np.int8),
    }
    header = dict(format_version=FORMAT_VERSION, classes=[], shards=["shards/shard-000000.tar"])
    header |= dict(splits=splits, statuses=statuses, members=["mp4", "json"])
    idx = DatasetIndex.from_bytes(
        DatasetIndex(columns, header, "memory://x").to_bytes(), "memory://x"
    )
    expected = [
        i
        for i, (sp, stt) in enumerate(codes)
        if (split is None or splits[sp] == split) and (status is None or statuses[stt] == status)
    ]
    assert idx.rows(split=split, status=status).tolist() == expected
    assert idx.split.tolist() == [splits[c[0]] for c in codes]
    for name, column in columns.items():
        np.testing.assert_array_equal(
            idx.column(name) if name not in ("key", "split", "status") else idx._columns[name],
            column,
        )


def test_truncated_faststart_mp4_is_reported_as_truncated(tmp_path):
    """An MP4 with its moov first (faststart, as downloaded datasets often are) cut short keeps a
    readable header: the probe notices the missing frames."""
    import av

    path = str(tmp_path / "clip.mp4")
    with av.open(path, mode="w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        rng = np.random.default_rng(0)
        for i in range(24):
            frame = av.VideoFrame.from_ndarray(
                rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), format="rgb24"
            )
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    data = (tmp_path / "clip.mp4").read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")
    assert probe_media(data, need_audio=False).status == "ok"
    cut = probe_media(data[: len(data) // 2], need_audio=False)
    assert cut.status == "truncated" and cut.num_frames == 24


def test_relative_local_url_survives_a_change_of_directory(tmp_path, monkeypatch):
    _write(str(tmp_path / "ds"))
    monkeypatch.chdir(tmp_path)
    idx = DatasetIndex.load("ds")
    monkeypatch.chdir("/")
    assert idx.url == str(tmp_path / "ds")
    assert json.loads(read_member(idx.open_fs(), idx, 1, "json")) == {"i": 1}


@pytest.mark.parametrize("scheme", ["local", "memory"])
def test_verify_finds_missing_and_short_shards(tmp_path, scheme, capsys):
    url = str(tmp_path / "ds") if scheme == "local" else f"memory://verify-{os.getpid()}/ds"
    idx = _write(url)
    assert idx.verify() == []
    fs = idx.open_fs()
    root = fs._strip_protocol(url)
    fs.rm_file(f"{root}/shards/shard-000001.tar")
    fs.pipe_file(
        f"{root}/shards/shard-000002.tar", fs.cat_file(f"{root}/shards/shard-000002.tar")[:600]
    )
    assert idx.verify() == [
        "shards/shard-000001.tar: missing",
        f"shards/shard-000002.tar: 600 bytes, index needs {idx.member(4, 'json')[1] + idx.member(4, 'json')[2]}",
    ]
    from avts_dist.cli import main

    assert main(["inspect", url, "--verify"]) == 1
    assert "verify    shards/shard-000001.tar: missing" in capsys.readouterr().out


def test_each_split_lies_contiguous_within_a_shard(tmp_path):
    """Clips of interleaved splits: within every shard each split's members form one byte run
    (block reads of a split then never skip another's clips), rows keep the order added."""
    splits = ["train", "pool", "train", "val", "pool", "train", "train", "pool", "val", "train"]
    with ShardWriter(str(tmp_path / "ds"), shard_size=5, members=("wav", "json")) as w:
        for i, split in enumerate(splits):
            files = {"wav": _wav(0.3 + 0.05 * i), "json": json.dumps({"i": i}).encode()}
            w.add(f"clip_{i}", files, label=0, split=split)
    idx = DatasetIndex.load(str(tmp_path / "ds"))
    assert idx.key.tolist() == [f"clip_{i}" for i in range(10)]
    assert idx.split.tolist() == splits
    fs = idx.open_fs()
    for shard in range(2):
        rows = [r for r in range(10) if idx.shard[r] == shard]
        spans = {}
        for r in rows:
            lo = min(o for o in idx.offset[r] if o >= 0) - 512  # its first tar header
            hi = max(o + s for o, s in zip(idx.offset[r], idx.size[r], strict=True) if o >= 0)
            spans.setdefault(splits[r], []).append((lo, hi))
        runs = sorted((min(a for a, _ in v), max(b for _, b in v), k) for k, v in spans.items())
        # Runs of different splits do not overlap, and nothing lies between a split's clips.
        for (_, hi, _), (lo, _, _) in zip(runs, runs[1:], strict=False):
            assert hi <= lo, runs
        for k, v in spans.items():
            total = sum(b - a for a, b in v)
            lo, hi = min(a for a, _ in v), max(b for _, b in v)
            assert hi - lo < total + 512 * len(v), (k, v)  # only tar padding between them
        for r in rows:
            assert json.loads(read_member(fs, idx, r, "json")) == {"i": r}
