"""Block reads that do not fragment, on moto S3 through a counting proxy: ``avts synth`` writes
each split contiguously within a shard, so the training clips of a shard are one block beside
the labelled pool's; the GETs and bytes per sample of an epoch match the formula of
docs/data-loading.md (``bench_blocks.predict_block_reads``). Issue 22's full set-up (960 clips,
0.013 GET per sample, 1.06x the clip bytes) is ``bench_blocks.py --only split_layout``."""

from __future__ import annotations

import pytest

from avts_dist.config import DataConfig
from avts_dist.data import DatasetIndex
from avts_dist.data.synthetic import synthesize
from tests.benchmarks.bench_blocks import epoch_reads, predict_block_reads
from tests.fixtures.faulty_s3 import FaultyS3Proxy

pytestmark = [pytest.mark.slow, pytest.mark.s3]

# The corpus (avts synth's defaults) at a quarter of its clips and shards.
CORPUS = dict(num_videos=240, seconds=4.0, fps=8.0, size=32, sample_rate=16000, num_classes=4)
CORPUS |= dict(shard_size=60, seed=0, val_fraction=0.0, test_fraction=0.0)
CORPUS |= dict(eval_train_fraction=0.15, eval_test_fraction=0.15)


@pytest.fixture
def counting_s3(s3_server):
    """A proxy in front of the moto server that counts requests and injects nothing."""
    proxy = FaultyS3Proxy(s3_server, fail_every=0).start()
    try:
        yield proxy
    finally:
        proxy.stop()


def test_block_reads_of_an_interleaved_corpus_match_the_formula(s3_bucket, counting_s3):
    url = f"s3://{s3_bucket}/ds"
    idx = synthesize(url, num_workers=1, **CORPUS)
    pool = idx.rows("eval_train").tolist() + idx.rows("eval_test").tolist()
    assert len(pool) > 40  # the pool lies between training clips in the order written
    opts = {"client_kwargs": {"endpoint_url": counting_s3.endpoint}}
    cfg = DataConfig(
        url=url, storage_options=opts, access="block", global_batch_size=6, num_workers=1,
        epochs=3, seed=0, num_frames=4, fps=8.0, size=16,
    )  # fmt: skip
    predicted = predict_block_reads(DatasetIndex.load(url), cfg)
    # Contiguous splits: one block of training clips per shard, whatever the pool.
    assert predicted["blocks_per_epoch"] == len(idx.shards) == 4
    run = epoch_reads(cfg, 2, counting_s3)
    assert run["samples_per_epoch"] == len(idx.rows("train")) // 6 * 6
    gets = run["gets_per_epoch"] / run["samples_per_epoch"]
    rows = idx.rows("train")
    mean_clip = float(idx.size[rows, idx.members.index("mp4")].mean())
    over_clip = run["ranged_bytes_per_epoch"] / run["samples_per_epoch"] / mean_clip
    assert abs(predicted["gets_per_sample"] / gets - 1) <= 0.25, (predicted, run)
    assert abs(predicted["bytes_per_sample_over_clip"] / over_clip - 1) <= 0.25, (predicted, run)
    assert over_clip <= 1.10, run  # the pool's clips are never read
    assert run["retries"] == 0 and run["outside_block_reads"] == 0, run
