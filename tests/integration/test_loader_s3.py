"""The pair loader over a real S3 endpoint (moto server on loopback), with and without faults."""

from __future__ import annotations

import pytest
import s3fs
import torch

from avts_dist.data import DatasetError, build_loader
from tests.fixtures.faulty_s3 import faulty_s3  # noqa: F401 (fixture)
from tests.integration.test_loader import data_cfg, run_world

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def s3_corpus(s3_server, synth_corpus):
    """The session's synthetic corpus, uploaded byte for byte to a bucket."""
    from tests.fixtures.s3 import make_bucket

    bucket = make_bucket(s3_server)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, skip_instance_cache=True)
    fs.put(synth_corpus, f"{bucket}/ds", recursive=True)
    return f"s3://{bucket}/ds"


def test_s3_gives_the_same_batches_as_local_disk(s3_corpus, synth_corpus):
    reference, _ = run_world(data_cfg(synth_corpus), 1, 2, keep_tensors=True)
    # Two ranks with a forked worker each for step 0, then three ranks resume for step 1.
    cfg = data_cfg(s3_corpus, num_workers=1)
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


def test_transient_s3_faults_are_retried(s3_corpus, synth_corpus, faulty_s3):  # noqa: F811
    reference, _ = run_world(data_cfg(synth_corpus), 1, 3)
    options = {
        "client_kwargs": {"endpoint_url": faulty_s3.endpoint},
        # botocore's own retries off, so the faults reach the loader's retry path.
        "config_kwargs": {"retries": {"max_attempts": 1}},
    }
    cfg = data_cfg(s3_corpus, storage_options=options, retry_backoff_s=0.01, max_retries=6)
    loader = build_loader(cfg)
    it = iter(loader)
    steps = [next(it) for _ in range(3)]
    loader.close()
    from tests.integration.test_loader import records

    assert [records(b) for b in steps] == reference
    assert faulty_s3.injected["503"] > 0 and faulty_s3.injected["drop"] > 0
    tel = loader.telemetry()
    assert tel["retries"] > 0 and tel["skipped_total"] == 0, tel


def test_missing_bucket_is_a_clear_error(s3_server):
    with pytest.raises(DatasetError, match="does not exist"):
        build_loader(data_cfg("s3://no-such-bucket-avts/ds"))
