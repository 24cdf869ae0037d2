"""The pair loader over a real S3 endpoint (moto server on loopback), with and without faults."""

from __future__ import annotations

import dataclasses

import pytest
import s3fs
import torch

from avts_dist.data import DatasetError, build_loader
from tests.fixtures.faulty_s3 import FaultyS3Proxy, faulty_s3  # noqa: F401 (fixture)
from tests.integration.test_loader import BLOCK, data_cfg, records, run_world

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def s3_corpus(s3_server, synth_corpus):
    """The session's synthetic corpus, uploaded byte for byte to a bucket."""
    from tests.fixtures.s3 import make_bucket

    bucket = make_bucket(s3_server)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, skip_instance_cache=True)
    fs.put(synth_corpus, f"{bucket}/ds", recursive=True)
    return f"s3://{bucket}/ds"


@pytest.mark.parametrize("access", ["random", "block"])
def test_s3_gives_the_same_batches_as_local_disk(s3_corpus, synth_corpus, access):
    kw = BLOCK if access == "block" else {"access": "random"}
    reference, _ = run_world(data_cfg(synth_corpus, **kw), 1, 2, keep_tensors=True)
    # Two ranks with a forked worker each for step 0, then three ranks resume for step 1.
    cfg = data_cfg(s3_corpus, num_workers=1, **kw)
    first, states = run_world(cfg, 2, 1, keep_tensors=True)
    rest, _ = run_world(cfg, 3, 1, state=states[0], keep_tensors=True)
    for (rec, video, neg), (ref, ref_video, ref_neg) in zip(first + rest, reference, strict=True):
        assert rec == ref and torch.equal(video, ref_video) and torch.equal(neg, ref_neg)
    loader = build_loader(cfg)
    next(iter(loader))
    tel = loader.telemetry()
    # Byte ranges only: a batch reads about its clips (plus easy negatives), not whole shards.
    assert 0 < tel["bytes_read"] < 3 * 6 * 100_000
    loader.close()


def _through(proxy):
    """Storage options that reach the moto server through ``proxy`` (nothing else: the loader
    turns the S3 client's own retries off itself)."""
    return {"client_kwargs": {"endpoint_url": proxy.endpoint}}


def test_transient_s3_faults_are_retried_and_every_retry_counted(
    s3_corpus,
    synth_corpus,
    faulty_s3,  # noqa: F811
):
    reference, _ = run_world(data_cfg(synth_corpus), 1, 3)
    cfg = data_cfg(
        s3_corpus,
        access="random",
        storage_options=_through(faulty_s3),
        retry_backoff_s=0.01,
        max_retries=6,
    )
    loader = build_loader(cfg)
    it = iter(loader)
    steps = [next(it) for _ in range(3)]
    loader.close()
    assert [records(b) for b in steps] == reference
    assert faulty_s3.injected["503"] > 0 and faulty_s3.injected["drop"] > 0
    tel = loader.telemetry()
    # Each injected fault failed one attempt, retried by us: none hidden in botocore or s3fs.
    assert tel["retries"] == faulty_s3.num_injected and tel["read_failures"] == 0, tel
    assert tel["skipped_total"] == 0
    assert tel["requests"] == faulty_s3.ranged_gets


@pytest.mark.parametrize("world_size", [1, 2])
def test_block_faults_mid_block_lose_and_repeat_nothing(
    s3_corpus, synth_corpus, s3_server, world_size
):
    """Blocks cut in the middle of their body, 503s and resets: every block is retried whole,
    and the batches are those of a fault-free run on local disk (nothing lost or repeated)."""
    local = data_cfg(synth_corpus, **BLOCK, epochs=2)
    reference, _ = run_world(local, 1, 2 * build_loader(local).steps_per_epoch)
    proxy = FaultyS3Proxy(s3_server, fail_every=6, faults=("cut", "503", "drop")).start()
    try:
        cfg = dataclasses.replace(
            local,
            url=s3_corpus,
            storage_options=_through(proxy),
            retry_backoff_s=0.01,
            max_retries=6,
        )
        loaders = [build_loader(cfg, rank=r, world_size=world_size) for r in range(world_size)]
        per_rank = [[records(b) for b in ld] for ld in loaders]
        for ld in loaders:
            ld.close()
    finally:
        proxy.stop()
    steps = [[r for rank in step for r in rank] for step in zip(*per_rank, strict=True)]
    assert steps == reference
    assert proxy.injected["cut"] > 0 and proxy.injected["503"] > 0
    tels = [ld.telemetry() for ld in loaders]
    # Every failed attempt is either retried or the last of a read given up (then the clip
    # alone is read): all counted, none hidden underneath.
    failed = sum(t["retries"] + t["read_failures"] for t in tels)
    assert failed == proxy.num_injected
    assert sum(t["requests"] for t in tels) == proxy.ranged_gets
    assert all(t["skipped_total"] == 0 for t in tels)


def test_missing_bucket_is_a_clear_error(s3_server):
    with pytest.raises(DatasetError, match="does not exist"):
        build_loader(data_cfg("s3://no-such-bucket-avts/ds"))
