"""Block access over local disk: coverage per epoch, reads served from the per-rank cache,
negatives from memory, one audio decode per clip, a bounded cache that is cleaned up. (The
guarantees shared with random access are parametrized in test_loader.py; S3 and faults in the
middle of a block: test_loader_s3.py.)"""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest

from avts_dist.data import DatasetIndex, build_loader
from avts_dist.data.blockcache import _PREFIX, _host
from tests.integration.test_loader import BLOCK, data_cfg


def block_cfg(url: str, **kw):
    return data_cfg(url, **{**BLOCK, **kw})


def test_every_clip_once_per_epoch(synth_corpus):
    idx = DatasetIndex.load(synth_corpus)
    train = sorted(str(k) for k in idx.key[idx.rows("train")])
    cfg = block_cfg(synth_corpus, global_batch_size=len(train) // 2, epochs=3)
    loader = build_loader(cfg)
    epochs: dict[int, Counter] = {}
    for batch in loader:
        epoch = int(batch["epoch"][0])
        epochs.setdefault(epoch, Counter()).update(batch["key"])
    loader.close()
    assert sorted(epochs) == [0, 1, 2]
    for counts in epochs.values():
        assert sorted(counts.elements()) == train  # the multiset: each clip exactly once


def test_reads_are_whole_pieces_and_negatives_come_from_memory(synth_corpus):
    mix = {"easy": 1.0, "hard": 1.0}
    loader = build_loader(block_cfg(synth_corpus, negative_mix=mix, epochs=2))
    sampler = loader.sampler
    batches = list(loader)
    loader.close()
    tel = loader.telemetry()
    # Each piece of each epoch read once, in one request, plus the probe read at build.
    layouts = [sampler.blocks(e) for e in range(2)]
    idx = loader.index
    num_pieces = sum(len(eb.piece_start) for eb in layouts)
    piece_bytes = sum(int((eb.piece_end - eb.piece_start).sum()) for eb in layouts)
    assert tel["requests"] == num_pieces + 1 and tel["retries"] == 0
    probe_bytes = tel["bytes_read"] - piece_bytes
    assert 0 < probe_bytes < 60_000  # one clip
    assert tel["block_fallback_reads"] == 0 and tel["outside_block_reads"] == 0
    # Easy negatives are clips of the sample's window (in memory), never the clip itself.
    row_of = {str(k): i for i, k in enumerate(idx.key)}
    for batch in batches:
        for key, neg, kind, pos, epoch in zip(
            batch["key"],
            batch["neg_key"],
            batch["neg_kind"].tolist(),
            batch["position"].tolist(),
            batch["epoch"].tolist(),
            strict=True,
        ):
            eb = sampler.blocks(epoch)
            window_rows = sampler.window_rows(eb, int(eb.window[sampler.slot(pos)]))
            assert row_of[key] in window_rows and row_of[neg] in window_rows
            assert (kind == 0) == (neg != key)
    # Audio is decoded once per clip: once for the positive and a same-clip negative.
    num_easy = sum(int((b["neg_kind"] == 0).sum()) for b in batches)
    assert tel["video_decodes"] == tel["clips"] == 2 * loader.steps_per_epoch * 6
    assert tel["audio_decodes"] == tel["clips"] + num_easy
    assert 0 < num_easy < tel["clips"]


def test_cache_is_bounded_shared_by_workers_and_removed(synth_corpus, tmp_path):
    base = tmp_path / "cache"
    base.mkdir()
    # A directory left by a process killed hard on this host (pid 2**22 + 1 is never alive).
    stale = base / f"{_PREFIX}{_host()}-{2**22 + 1}-r0-dead"
    stale.mkdir()
    (stale / "e0-p0").write_bytes(b"x" * 100)
    cfg = block_cfg(synth_corpus, num_workers=2, block_cache_dir=str(base), epochs=2)
    loader = build_loader(cfg)
    assert not stale.exists()
    root = loader.cache.root
    it = iter(loader)
    next(it)
    assert os.path.isdir(root) and any(n.startswith("e0-p") for n in os.listdir(root))
    rest = list(it)
    tel = loader.telemetry()
    loader.close()
    assert not os.path.exists(root) and os.listdir(base) == []
    assert len(rest) == 2 * loader.steps_per_epoch - 1
    assert 0 < tel["block_cache_peak_mb"] <= tel["block_cache_bound_mb"]
    # Two workers, one fetch per piece: each piece of each epoch once, plus the probe.
    num_pieces = sum(len(loader.sampler.blocks(e).piece_start) for e in range(2))
    assert tel["requests"] == num_pieces + 1


def test_state_names_the_order_and_refuses_another(synth_corpus):
    block = build_loader(block_cfg(synth_corpus))
    state = block.state_dict()
    assert state["order"].startswith("block:") and json.loads(json.dumps(state)) == state
    other = build_loader(data_cfg(synth_corpus, access="random"))
    with pytest.raises(ValueError, match=r"order \(data.access, data.block_\*\): saved block"):
        other.load_state_dict(state)
    # A version-1 state (before block access) is a random-access state.
    legacy = {k: v for k, v in other.state_dict().items() if k != "order"} | {"version": 1}
    other.load_state_dict(legacy)
    with pytest.raises(ValueError, match="saved random"):
        block.load_state_dict(legacy)
    again = build_loader(block_cfg(synth_corpus))
    assert np.array_equal(block.sampler.order(0), again.sampler.order(0))
    for loader in (block, other, again):
        loader.close()


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"access": "fast"}, "data.access"),
        ({"block_mb": 0}, "data.block_mb"),
        ({"shuffle_window_blocks": 0}, "data.shuffle_window_blocks"),
        ({"block_streams": 4}, "data.block_streams"),  # does not divide 6
        ({"max_skip_fraction": 1.5}, "data.max_skip_fraction"),
    ],
)
def test_block_config_errors_name_the_key(override, key):
    from avts_dist.config import ConfigError

    with pytest.raises(ConfigError, match=rf"'{key}'"):
        data_cfg("unused", **override)
