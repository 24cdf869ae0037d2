"""The pair loader over local disk: elastic resume, worker independence, the negative-mix
schedule, the evaluation path, bad data, missing shards, the skip budget and clear errors, with
random and block access. (Block specifics: test_loader_blocks.py; S3: test_loader_s3.py.)"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil

import numpy as np
import pytest
import torch

from avts_dist.config import DataConfig
from avts_dist.data import DatasetError, DatasetIndex, build_loader
from avts_dist.data.health import SkippedClipsError
from avts_dist.data.synthetic import make_clip

MIX3 = {"easy": 1.0, "hard": 1.0, "superhard": 1.0}
# Block access on the 28 KB test clips: about two clips per block, two blocks per window.
BLOCK = dict(access="block", block_mb=0.06, shuffle_window_blocks=2)
ACCESS = {"random": dict(access="random"), "block": BLOCK}


def data_cfg(url: str, **kw) -> DataConfig:
    base = dict(url=url, global_batch_size=6, num_workers=0, negative_mix=MIX3, seed=5)
    return DataConfig(**{**base, **kw})


def records(batch) -> list[tuple]:
    """What identifies a sample: clip, windows, negative."""
    return [
        (k, round(float(vs), 9), nk, int(kind), round(float(ns), 9))
        for k, vs, nk, kind, ns in zip(
            batch["key"],
            batch["video_start"],
            batch["neg_key"],
            batch["neg_kind"],
            batch["neg_audio_start"],
            strict=True,
        )
    ]


def run_world(cfg, world_size, num_steps, state=None, keep_tensors=False):
    """Steps of all ranks of one world size, in lockstep; returns (global steps, final states).

    Each global step is the concatenation of the ranks' records (rank order)."""
    loaders = [build_loader(cfg, rank=r, world_size=world_size) for r in range(world_size)]
    for ld in loaders:
        if state is not None:
            ld.load_state_dict(json.loads(json.dumps(state)))
    its = [iter(ld) for ld in loaders]
    steps = []
    for _ in range(num_steps):
        batches = [next(it) for it in its]
        assert all(len(b["key"]) == cfg.global_batch_size // world_size for b in batches)
        rec = [r for b in batches for r in records(b)]
        if keep_tensors:
            rec = (
                rec,
                torch.cat([b["video"] for b in batches]),
                torch.cat([b["neg_audio"] for b in batches]),
            )
        steps.append(rec)
    states = [ld.state_dict() for ld in loaders]
    for ld in loaders:
        ld.close()
    return steps, states


def test_batch_layout(synth_corpus):
    cfg = data_cfg(synth_corpus)
    loader = build_loader(cfg, rank=0, world_size=2)
    batch = next(iter(loader))
    assert batch["video"].shape == (3, 3, cfg.num_frames, cfg.size, cfg.size)
    assert batch["audio"].shape == batch["neg_audio"].shape
    assert batch["audio"].shape[:3] == (3, 1, cfg.num_mel_bins)
    assert batch["neg_kind"].dtype == torch.long and batch["label"].dtype == torch.long
    assert torch.equal(batch["video_start"], batch["audio_start"])
    assert len(batch["key"]) == len(batch["neg_key"]) == 3
    # uint8 video: a quarter of float32's bytes through the worker queues and to the device.
    assert batch["video"].dtype == torch.uint8 and batch["video"].max() > 0
    assert torch.isfinite(batch["audio"]).all()
    assert loader.global_step == 1 and loader.epoch == 0


@pytest.mark.parametrize("access", ACCESS)
def test_resume_at_other_world_sizes(synth_corpus, access):
    cfg = data_cfg(synth_corpus, **ACCESS[access])
    total, k = 5, 2
    reference, _ = run_world(cfg, 1, total, keep_tensors=True)
    first, states = run_world(cfg, 2, k)
    # The state is global: the same on every rank, and JSON.
    assert states[0] == states[1] and states[0]["global_step"] == k
    assert first == [r for r, _, _ in reference[:k]]
    for world_size in (1, 3):
        rest, _ = run_world(cfg, world_size, total - k, state=states[0], keep_tensors=True)
        for (rec, video, neg), (ref_rec, ref_video, ref_neg) in zip(
            rest, reference[k:], strict=True
        ):
            assert rec == ref_rec
            assert torch.equal(video, ref_video) and torch.equal(neg, ref_neg)
    # The run crossed epochs, and epochs differ in order.
    steps_per_epoch = build_loader(cfg).steps_per_epoch
    assert total > steps_per_epoch
    assert [r[0] for r in reference[0][0]] != [r[0] for r in reference[steps_per_epoch][0]]


@pytest.mark.parametrize("access", ACCESS)
def test_any_number_of_workers_gives_the_same_batches(synth_corpus, access):
    steps0, _ = run_world(
        data_cfg(synth_corpus, num_workers=0, **ACCESS[access]), 1, 3, keep_tensors=True
    )
    steps2, _ = run_world(
        data_cfg(synth_corpus, num_workers=2, **ACCESS[access]), 1, 3, keep_tensors=True
    )
    for (r0, v0, n0), (r2, v2, n2) in zip(steps0, steps2, strict=True):
        assert r0 == r2 and torch.equal(v0, v2) and torch.equal(n0, n2)


@pytest.mark.parametrize("access", ACCESS)
def test_negative_mix_schedule_is_replayed_on_resume(synth_corpus, access):
    cfg = data_cfg(synth_corpus, negative_mix={"easy": 1.0}, num_workers=1, **ACCESS[access])
    loader = build_loader(cfg)
    it = iter(loader)
    kinds, recs, states = [], [], {}
    for step in range(6):
        if step == 2:
            loader.set_negative_mix({"hard": 1.0})
        if step == 4:
            loader.set_negative_mix({"superhard": 1.0, "easy": 0.0})
        # Saved after the step's mix change, before the step's batch (as a checkpoint would).
        states[step] = loader.state_dict()
        batch = next(it)
        kinds.append(set(batch["neg_kind"].tolist()))
        recs.append(records(batch))
    loader.close()
    # Effective from the next global step, even with batches already prefetched by a worker.
    assert kinds == [{0}, {0}, {1}, {1}, {2}, {2}]
    assert states[4]["mix_schedule"] == [
        [0, {"easy": 1.0}],
        [2, {"hard": 1.0}],
        [4, {"superhard": 1.0}],
    ]
    serial = dataclasses.replace(cfg, num_workers=0)
    # Resumed after every change: the whole schedule is replayed, at any world size.
    for world_size in (1, 2):
        rest, _ = run_world(serial, world_size, 2, state=states[4])
        assert rest == recs[4:]
    # Resumed before the step-4 change: the resumed run makes the same call and gets the same.
    loader = build_loader(serial)
    loader.load_state_dict(states[3])
    it = iter(loader)
    again = [records(next(it))]
    loader.set_negative_mix({"superhard": 1.0})
    again += [records(next(it)) for _ in range(2)]
    loader.close()
    assert again == recs[3:]


def test_eval_path_is_fixed(synth_corpus):
    cfg = data_cfg(synth_corpus, negative_mix={"easy": 1.0})
    loader = build_loader(cfg, train=False)
    assert loader.split == "val"
    first = [records(b) for b in loader]
    second = [records(b) for b in loader]
    assert first == second and len(first) == len(loader) == loader.steps_per_epoch
    idx = DatasetIndex.load(synth_corpus)
    durations = dict(zip(idx.key, idx.duration, strict=True))
    clip_s = cfg.num_frames / cfg.fps
    for key, start, _, kind, _ in first[0]:
        assert kind == 0 and start == pytest.approx((durations[key] - clip_s) / 2, abs=1e-6)
    # Every val clip is in the pass (the last batch is topped up by wrapping around).
    assert {r[0] for step in first for r in step} == set(idx.key[idx.rows("val")])


def test_clear_errors_at_build_time(synth_corpus, tmp_path):
    with pytest.raises(DatasetError, match="index.npz not found"):
        build_loader(data_cfg(str(tmp_path / "nothing")))
    with pytest.raises(DatasetError, match="empty or absent"):
        build_loader(data_cfg(synth_corpus, split="nosuchsplit"))
    with pytest.raises(ValueError, match="divisible"):
        build_loader(data_cfg(synth_corpus), rank=0, world_size=4)
    with pytest.raises(DatasetError, match="fewer than one global batch"):
        build_loader(data_cfg(synth_corpus, global_batch_size=600))
    # Shards gone but index present: named at start, not in a worker.
    broken = tmp_path / "noshards"
    shutil.copytree(synth_corpus, broken)
    shutil.rmtree(broken / "shards")
    with pytest.raises(DatasetError, match=r"shard-000000.tar \(missing\)"):
        build_loader(data_cfg(str(broken)))
    loader = build_loader(data_cfg(synth_corpus))
    with pytest.raises(ValueError, match="does not match"):
        loader.load_state_dict({**loader.state_dict(), "global_batch_size": 12})


def test_broken_corpus_is_filtered_and_counted(broken_corpus):
    loader = build_loader(data_cfg(broken_corpus, global_batch_size=4))
    it = iter(loader)
    keys = {k for _ in range(3) for k in next(it)["key"]}
    idx = DatasetIndex.load(broken_corpus)
    broken = set(idx.key[idx.column("broken") != ""])
    assert broken and not keys & broken
    filtered = loader.telemetry()["filtered"]
    # truncated and garbage are "unreadable" to the probe; the other kinds keep their names.
    assert filtered == {"unreadable": 2, "no_audio": 1, "too_short": 1}


def _corrupt_in_place(root, idx: DatasetIndex, row: int, data: bytes) -> None:
    shard_url, offset, size = idx.member(row, "mp4")
    data = data[:size] + b"\0" * max(0, size - len(data))
    with open(shard_url, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize("access", ACCESS)
def test_clips_failing_at_decode_time_are_replaced_and_counted(
    synth_corpus, tmp_path, caplog, access
):
    """The index says "ok", the bytes say otherwise: every kind is replaced deterministically."""
    root = tmp_path / "ds"
    shutil.copytree(synth_corpus, root)
    idx = DatasetIndex.load(str(root))
    train = idx.rows("train")
    common = dict(fps=8.0, size=32, sample_rate=16000, num_classes=4, seed=0)
    _, short, _ = make_clip(90, seconds=0.4, **common)
    _, silent, _ = make_clip(91, seconds=4.0, broken="no_audio", **common)
    good = open(idx.member(train[3], "mp4")[0], "rb").read()  # noqa: SIM115
    bad = {
        int(train[0]): np.random.default_rng(0).bytes(50_000),  # garbage
        int(train[1]): b"",  # truncated to nothing: zeros
        int(train[2]): silent["mp4"],  # no audio track
        int(train[4]): short["mp4"],  # too short for a 1 s window
    }
    assert good
    for row, data in bad.items():
        _corrupt_in_place(root, idx, row, data)
    bad_keys = {str(idx.key[r]) for r in bad}
    cfg = data_cfg(
        str(root), negative_mix={"easy": 1.0, "hard": 1.0}, max_skip_fraction=1.0, **ACCESS[access]
    )
    runs = []
    for _ in range(2):
        loader = build_loader(cfg)
        it = iter(loader)
        with caplog.at_level(logging.WARNING, logger="avts.data"):
            caplog.clear()
            steps = [next(it) for _ in range(2 * loader.steps_per_epoch)]
        runs.append([records(b) for b in steps])
        for b in steps:
            assert len(b["key"]) == 6
            assert not (set(b["key"]) | set(b["neg_key"])) & bad_keys
        tel = loader.telemetry()
        assert {"decode_error", "no_audio", "too_short"} <= set(tel["skipped"]), tel
        # Each bad key is logged once, however often it was drawn.
        logged = [r.getMessage().split()[3] for r in caplog.records]
        assert sorted(logged) == sorted(set(logged)) and set(logged) <= bad_keys
        loader.close()
    assert runs[0] == runs[1]


def test_telemetry_counts_reads_and_time(synth_corpus):
    loader = build_loader(data_cfg(synth_corpus))
    it = iter(loader)
    for _ in range(2):
        next(it)
    tel = loader.telemetry()
    assert tel["clips"] == 12 and tel["bytes_read"] > 0 and tel["decode_s"] > 0
    assert tel["clips_per_s"] > 0 and tel["wait_s"] > 0 and tel["skipped_total"] == 0
    assert tel["global_step"] == 2


def test_finite_epochs_end_and_resume_mid_epoch(synth_corpus):
    cfg = data_cfg(synth_corpus, epochs=1)
    loader = build_loader(cfg)
    assert not loader.infinite and len(loader) == loader.steps_per_epoch
    full = [records(b) for b in loader]
    assert len(full) == loader.steps_per_epoch
    assert list(loader) == []  # exhausted: the global step is at the end
    resumed = build_loader(cfg)
    resumed.load_state_dict({**loader.state_dict(), "global_step": 1, "epoch": 0})
    assert [records(b) for b in resumed] == full[1:]


def _copy_without_shard(synth_corpus, tmp_path, shard: str, truncate: bool = False):
    root = tmp_path / "ds"
    shutil.copytree(synth_corpus, root)
    path = root / "shards" / shard
    if truncate:
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
    else:
        path.unlink()
    return root, DatasetIndex.load(str(root))


@pytest.mark.parametrize("truncate", [False, True])
def test_missing_shard_stops_at_build_naming_it(synth_corpus, tmp_path, truncate):
    root, idx = _copy_without_shard(synth_corpus, tmp_path, "shard-000001.tar", truncate)
    state = "bytes, truncated" if truncate else "missing"
    with pytest.raises(
        DatasetError, match=rf"shards/shard-000001.tar \(.*{state}\).*allow_missing"
    ):
        build_loader(data_cfg(str(root)))


def test_allowed_missing_shard_warns_with_the_share_lost(synth_corpus, tmp_path, caplog):
    root, idx = _copy_without_shard(synth_corpus, tmp_path, "shard-000001.tar")
    train = idx.rows("train")
    lost = {str(k) for k in idx.key[train[idx.shard[train] == 1]]}
    with caplog.at_level(logging.WARNING, logger="avts.data"):
        loader = build_loader(data_cfg(str(root), allow_missing_shards=True, global_batch_size=2))
    share = f"{100 * len(lost) / len(train):.1f}%"
    assert any(
        "shard-000001.tar" in r.getMessage() and share in r.getMessage() for r in caplog.records
    )
    tel = loader.telemetry()
    assert tel["filtered"]["missing_shard"] == len(lost)
    assert tel["missing_shards"] == ["shards/shard-000001.tar"]
    it = iter(loader)
    seen = {k for _ in range(loader.steps_per_epoch) for k in next(it)["key"]}
    loader.close()
    assert seen and not seen & lost


def test_too_many_failing_clips_stop_with_reasons_counted(synth_corpus, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(synth_corpus, root)
    idx = DatasetIndex.load(str(root))
    train = idx.rows("train")
    for i, row in enumerate(train[: len(train) // 2]):
        _corrupt_in_place(root, idx, int(row), np.random.default_rng(i).bytes(40_000))
    cfg = data_cfg(str(root), negative_mix={"hard": 1.0}, max_skip_fraction=0.2)
    loader = build_loader(cfg)
    it = iter(loader)
    with pytest.raises(
        SkippedClipsError, match=r"clips tried failed \(.*decode_error \d+.*max_skip_fraction=0.2"
    ):
        for _ in range(40):
            next(it)
    assert loader.telemetry()["skip_fraction"] > 0.2
    loader.close()
    # Below the budget it trains on.
    loader = build_loader(dataclasses.replace(cfg, max_skip_fraction=0.9))
    it = iter(loader)
    for _ in range(12):
        next(it)
    assert 0.2 < loader.telemetry()["skip_fraction"] <= 0.9
    loader.close()
