"""synth -> shards -> index -> read back, on local disk and on a real S3 endpoint over HTTP
(moto server), through the library and the `avts synth` / `avts inspect` CLI."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time

import decord
import numpy as np
import pytest

from avts_dist.cli import main
from avts_dist.data.index import INDEX_NAME, DatasetIndex, read_member
from avts_dist.data.synthetic import synthesize
from avts_dist.storage import get_fs
from tests.fixtures.corpus import SYNTH_CORPUS, audio_onsets, visual_onset_frames

CLI_ARGS = [
    "--num-videos", str(SYNTH_CORPUS["num_videos"]), "--seconds", "4", "--fps", "8", "--size", "32",
    "--sample-rate", "16000", "--num-classes", "4", "--shard-size", "8", "--seed", "0",
    "--num-workers", "1", "--eval-train-fraction", "0", "--eval-test-fraction", "0",
]  # fmt: skip


def _check_clips_decode(idx: DatasetIndex, rows) -> None:
    fs = idx.open_fs()
    for row in rows:
        meta = json.loads(read_member(fs, idx, row, "json"))
        assert meta["key"] == idx.key[row] and meta["label"] == idx.label[row]
        assert meta["split"] == idx.split[row] and meta["class_name"] == idx.classes[meta["label"]]
        assert idx.duration[row] == pytest.approx(meta["duration"], abs=1e-3)
        assert (idx.fps[row], idx.sample_rate[row]) == (meta["fps"], meta["sample_rate"])
        mp4 = read_member(fs, idx, row, "mp4")
        vr = decord.VideoReader(io.BytesIO(mp4))
        assert len(vr) == idx.num_frames[row] == meta["num_frames"]
        frames = vr.get_batch(list(range(len(vr)))).asnumpy()
        assert frames.shape[1:] == (meta["size"], meta["size"], 3)
        frame_ids = [round(t * meta["fps"]) for t in meta["events"]]
        assert visual_onset_frames(frames) == [f for f in frame_ids if f >= 1]
        sr = int(idx.sample_rate[row])
        wave = decord.AudioReader(io.BytesIO(mp4), sample_rate=sr, mono=True)[:].asnumpy()[0]
        assert 0 <= len(wave) - meta["duration"] * sr < 1024
        # From 20 ms on: before, the burst of an event before t = 0 may still be decaying.
        onsets = [t for t in audio_onsets(wave, sr, hold_s=0.2) if t >= 0.02]
        events = [t for t in meta["events"] if t >= 0.02]
        np.testing.assert_allclose(onsets, events, atol=1.0 / meta["fps"])


def test_local_round_trip(synth_corpus):
    idx = DatasetIndex.load(synth_corpus)
    assert len(idx) == 16 and len(idx.shards) == 2 and idx.classes == ["even", "swing", "gallop"]
    label_sets = idx.header["metadata"]["label_sets"]
    assert label_sets["rhythm"] == idx.classes and len(label_sets["appearance"]) == 4
    assert set(idx.split) <= {"train", "val"} and (idx.status == "ok").all()
    assert idx.has_video.all() and idx.has_audio.all()
    # Shards are plain tar files in webdataset naming, clips in index order within each split,
    # each split of a shard in one run (splits in the order they first appear in the index).
    names, expected = [], []
    split_order = list(dict.fromkeys(idx.split.tolist()))
    for i, shard in enumerate(idx.shards):
        with tarfile.open(os.path.join(synth_corpus, shard)) as tf:
            names += tf.getnames()
        rows = sorted(np.flatnonzero(idx.shard == i), key=lambda r: split_order.index(idx.split[r]))
        expected += [f"{idx.key[r]}.{ext}" for r in rows for ext in ("mp4", "json")]
    assert names == expected
    assert set(idx.split) == {"train", "val"}  # the layout above is not the index order
    _check_clips_decode(idx, range(len(idx)))


def _next_second() -> None:
    """Sleeps into the next wall-clock second, so two writes never share a timestamp."""
    time.sleep(1.05 - time.time() % 1.0)


def _shard_members(read, shards: list[str]) -> list[tuple[str, int, bytes]]:
    """(name, mtime, bytes) of every member, in order, shard after shard."""
    members = []
    for shard in shards:
        with tarfile.open(fileobj=io.BytesIO(read(shard))) as tf:
            members += [(m.name, m.mtime, tf.extractfile(m).read()) for m in tf.getmembers()]
    return members


def _assert_same_dataset(ref: DatasetIndex, ref_read, other: DatasetIndex, other_read, what: str):
    """Same shard bytes (member by member, for a message that names the clip) and the same index
    columns and header; index.npz's own bytes are the index writer's concern."""
    assert other.shards == ref.shards, what
    ref_members = _shard_members(ref_read, ref.shards)
    other_members = _shard_members(other_read, other.shards)
    assert [m[:2] for m in other_members] == [m[:2] for m in ref_members], what
    for (name, _, a), (_, _, b) in zip(ref_members, other_members, strict=True):
        assert a == b, f"{what}: {name} differs ({len(a)} vs {len(b)} bytes)"
    for shard in ref.shards:
        assert other_read(shard) == ref_read(shard), f"{what}: {shard}"
    assert other.header == ref.header, what
    for name in ref.column_names():
        np.testing.assert_array_equal(other.column(name), ref.column(name), err_msg=what)


@pytest.mark.s3
def test_same_seed_same_bytes_on_any_storage_at_any_time_serial_or_parallel(
    s3_bucket, tmp_path, capsys
):
    """The issue-11 case (seed 4, 16 clips, 32 px, shards of 8): local, S3 through the CLI,
    a process pool and a later local write, each in its own second, give the same dataset."""
    params = dict(SYNTH_CORPUS, seed=4, eval_train_fraction=0.2, eval_test_fraction=0.2)
    ref = synthesize(str(tmp_path / "first"), **params)

    def local(root: str):
        return lambda rel: (tmp_path / root / rel).read_bytes()

    _next_second()
    url = f"s3://{s3_bucket}/seed4"
    argv = ["synth", "--out", url, *CLI_ARGS, "--seed", "4"]
    argv += ["--eval-train-fraction", "0.2", "--eval-test-fraction", "0.2"]
    assert main(argv) == 0
    capsys.readouterr()
    fs, root = get_fs(url)
    _assert_same_dataset(
        ref, local("first"), DatasetIndex.load(url), lambda rel: fs.cat_file(f"{root}/{rel}"), "s3"
    )
    _next_second()
    parallel = synthesize(str(tmp_path / "parallel"), num_workers=2, **params)
    _assert_same_dataset(ref, local("first"), parallel, local("parallel"), "parallel")
    _next_second()
    again = synthesize(str(tmp_path / "again"), **params)
    _assert_same_dataset(ref, local("first"), again, local("again"), "later")


def test_parallel_synthesis_with_broken_clips_writes_the_same_bytes(tmp_path):
    params = dict(
        num_videos=5,
        seconds=1.0,
        fps=8.0,
        size=16,
        sample_rate=8000,
        num_classes=2,
        shard_size=2,
        seed=3,
        broken_fraction=0.4,
    )
    serial = synthesize(str(tmp_path / "serial"), **params)
    parallel = synthesize(str(tmp_path / "parallel"), num_workers=2, **params)
    _assert_same_dataset(
        serial,
        lambda rel: (tmp_path / "serial" / rel).read_bytes(),
        parallel,
        lambda rel: (tmp_path / "parallel" / rel).read_bytes(),
        "parallel",
    )


@pytest.mark.s3
def test_s3_cli_round_trip(s3_bucket, synth_corpus, capsys):
    url = f"s3://{s3_bucket}/corpora/synth"
    assert main(["synth", "--out", url, *CLI_ARGS]) == 0
    assert "wrote 16 clips (16 ok) in 2 shards" in capsys.readouterr().out
    assert main(["inspect", url, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    local = DatasetIndex.load(synth_corpus)
    assert summary["clips"] == 16 and summary["shards"] == 2 and summary["classes"] == 3
    assert summary["hours"] == pytest.approx(16 * 4 / 3600, abs=1e-3)
    assert summary["audio_share"] == 1.0 and summary["broken_clips"] == 0
    assert summary["splits"]["train"]["clips"] == int((local.split == "train").sum())
    assert main(["inspect", url]) == 0
    assert "clips     16" in capsys.readouterr().out

    idx = DatasetIndex.load(url)
    assert idx.member(0, "mp4")[0] == f"{url}/shards/shard-000000.tar"
    _check_clips_decode(idx, [0, 9])
    assert idx.verify() == []
    # Same seed, same bytes, whichever storage it went to.
    fs, root = get_fs(url)
    _assert_same_dataset(
        local,
        lambda rel: open(os.path.join(synth_corpus, rel), "rb").read(),  # noqa: SIM115
        idx,
        lambda rel: fs.cat_file(f"{root}/{rel}"),
        "s3",
    )


@pytest.mark.s3
def test_s3_errors_are_one_line_exit_2(s3_bucket, capsys):
    fs, _ = get_fs(f"s3://{s3_bucket}")
    cases = [
        (["inspect", "s3://no-such-bucket-avts/ds"], "bucket 'no-such-bucket-avts' does not exist"),
        (["inspect", f"s3://{s3_bucket}/empty"], "index.npz not found"),
        (["synth", "--out", "s3://no-such-bucket-avts/ds", "--num-videos", "1"], "does not exist"),
        (["inspect", "nope://x"], "Protocol not known"),
    ]
    fs.pipe_file(f"{s3_bucket}/bad/{INDEX_NAME}", b"PK\x03\x04 but not a zip")
    cases.append((["inspect", f"s3://{s3_bucket}/bad"], "malformed index"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.s3
def test_cli_process_reports_missing_bucket(s3_server):
    out = subprocess.run(
        [sys.executable, "-m", "avts_dist", "inspect", "s3://no-such-bucket-avts/ds"],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ.copy(),  # carries the fixture's AWS_ENDPOINT_URL and test credentials
    )
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f"avts inspect: error: bucket 'no-such-bucket-avts' does not exist at {s3_server} "
        "(for s3://no-such-bucket-avts/ds)"
    )


def test_broken_clips_are_reported(broken_corpus, capsys):
    idx = DatasetIndex.load(broken_corpus)
    declared = idx.column("broken")
    expected = {"": "ok", "truncated": "unreadable", "garbage": "unreadable"}
    expected |= {"no_audio": "no_audio", "too_short": "too_short"}
    assert sorted(d for d in declared if d) == ["garbage", "no_audio", "too_short", "truncated"]
    assert [expected[d] for d in declared] == idx.status.tolist()
    # The clip JSON records the same reason.
    fs = idx.open_fs()
    assert [
        json.loads(read_member(fs, idx, r, "json"))["broken"] or "" for r in range(len(idx))
    ] == declared.tolist()
    assert main(["inspect", broken_corpus, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["broken_clips"] == 4 and summary["ok_clips"] == 4
    assert summary["broken_by_reason"] == {"no_audio": 1, "too_short": 1, "unreadable": 2}
    assert summary["audio_share"] == pytest.approx(5 / 8)  # truncated/garbage/no_audio have none
    assert main(["inspect", broken_corpus]) == 0
    assert "broken    4 (no_audio 1, too_short 1, unreadable 2)" in capsys.readouterr().out
    # Healthy rows only, by default.
    assert sorted(idx.rows(status="ok").tolist()) == [r for r in range(8) if not declared[r]]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num-videos", "0"], "num_videos must be > 0"),
        (["--size", "33"], "size must be even"),
        (["--broken-fraction", "1.5"], "broken_fraction must be in [0, 1]"),
    ],
)
def test_synth_rejects_bad_arguments_in_one_line(tmp_path, capsys, argv, message):
    assert main(["synth", "--out", str(tmp_path / "ds"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "ds").exists()  # nothing touched before the arguments were checked
