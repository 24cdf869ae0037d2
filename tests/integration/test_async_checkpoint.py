"""Checkpoints off the critical path (``checkpoint.async_upload=true``), with real training: two
processes (gloo), DeepSpeed, checkpoints every 2 steps to the moto S3 server, each rank staging
in a folder of its own (as nodes without a shared filesystem).

- ``kill -9`` while the step-6 upload is in flight leaves step 4 as ``latest`` (the upload of 6
  was never published), and ``resume=auto`` from it is bitwise the uninterrupted run;
- an outage of the endpoint while step 4 uploads: training goes on, the upload is retried (each
  failure logged), and every checkpoint is published in the end;
- a preemption waits for its upload, within ``checkpoint.preempt_wait_s``.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from avts_dist.cli.train import EXIT_PREEMPTED
from avts_dist.train.checkpoint import tag_for
from tests.fixtures.faulty_s3 import FaultyS3Proxy
from tests.fixtures.s3 import make_bucket
from tests.integration.test_train import _config, _ok, avts_train, metrics

pytestmark = pytest.mark.slow


def _s3(bucket: str, tmp: Path, endpoint: str = "") -> tuple[str, ...]:
    options = (
        # One botocore attempt per request: an outage reaches the upload's own retries.
        f"checkpoint.storage_options={{client_kwargs: {{endpoint_url: '{endpoint}'}}, "
        "config_kwargs: {retries: {max_attempts: 1}}}"
    )
    return (
        f"checkpoint.dir=s3://{bucket}/ckpt", f"checkpoint.staging_dir={tmp}/stage_$RANK",
        "checkpoint.async_upload=true", "tracking.enabled=false",
        *([options] if endpoint else []),
    )  # fmt: skip


def _store(bucket: str, endpoint: str):
    import s3fs

    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)


@pytest.fixture(scope="module")
def async_ref(tmp_path_factory, train_corpus_shared, s3_server):
    """The uninterrupted run, asynchronous: 8 steps, checkpoints at 2, 4, 6, 8 on S3."""
    tmp = tmp_path_factory.mktemp("async_ref")
    cfg = _config(tmp, train_corpus_shared)
    bucket = make_bucket(s3_server)
    proc = avts_train(tmp, cfg, "run.name=ref", *_s3(bucket, tmp), nproc=2)
    _ok(proc)
    return {"cfg": cfg, "bucket": bucket, "metrics": metrics(tmp / "runs" / "ref"), "proc": proc}


def test_async_run_publishes_every_checkpoint(async_ref, s3_server):
    fs = _store(async_ref["bucket"], s3_server)
    root = f"{async_ref['bucket']}/ckpt"
    assert fs.cat_file(f"{root}/latest") == b"step_000008"
    tags = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root) if "/step_" in p)
    assert tags == ["step_000004", "step_000006", "step_000008"]  # keep_last=3
    meta = json.loads(fs.cat_file(f"{root}/step_000008/COMPLETE"))
    assert {"rng_rank_00000.pt", "rng_rank_00001.pt"} <= set(meta["files"])
    assert not fs.exists(f"{root}/.uploads") or not fs.ls(f"{root}/.uploads")
    assert sorted(async_ref["metrics"]) == list(range(1, 9))


def test_kill_during_upload_keeps_previous_latest_and_resume_is_bitwise(
    async_ref, tmp_path, s3_server
):
    cfg, bucket = async_ref["cfg"], make_bucket(s3_server)
    # SIGKILL on both ranks once each has stored its first file of step 6, before any marker.
    killed = avts_train(
        tmp_path, cfg, "run.name=kill", *_s3(bucket, tmp_path), nproc=2,
        hooks=("--kill-at", "upload_started:6"),
    )  # fmt: skip
    assert killed.returncode != 0
    fs, root = _store(bucket, s3_server), f"{bucket}/ckpt"
    assert fs.cat_file(f"{root}/latest") == b"step_000004"
    assert fs.ls(f"{root}/step_000006")  # the upload had started...
    assert not fs.exists(f"{root}/step_000006/COMPLETE")  # ...and was never published

    resumed = avts_train(tmp_path, cfg, "run.name=kill", "resume=auto", *_s3(bucket, tmp_path),
                         nproc=2)  # fmt: skip
    _ok(resumed)
    assert "resumed from s3://" in resumed.stderr and "step_000004" in resumed.stderr
    ref, got = async_ref["metrics"], metrics(tmp_path / "runs" / "kill")
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step]["loss"] == ref[step]["loss"], f"step {step} differs"
        assert got[step]["lr"] == ref[step]["lr"]
    fs.invalidate_cache()
    assert fs.cat_file(f"{root}/latest") == b"step_000008"


def test_outage_during_upload_is_retried_and_training_goes_on(async_ref, tmp_path, s3_server):
    cfg, bucket = async_ref["cfg"], make_bucket(s3_server)
    proxy = FaultyS3Proxy(s3_server, fail_every=0).start()
    try:
        # Writes of step 4 are refused for 6 s; a step takes well under a second.
        proxy.outage("/ckpt/step_000004/", 6.0)
        proc = avts_train(
            tmp_path, cfg, "run.name=outage", *_s3(bucket, tmp_path, proxy.endpoint), nproc=2
        )
    finally:
        proxy.stop()
    _ok(proc)
    assert proxy.outage_refused > 0
    assert "checkpoint step_000004: upload to s3://" in proc.stderr
    assert "retrying in" in proc.stderr
    # The save of step 6 found step 4's upload still retrying: steps 5 and 6 ran meanwhile.
    assert "waited" in proc.stderr and "for the previous upload (step_000004)" in proc.stderr
    got = metrics(tmp_path / "runs" / "outage")
    assert [got[s]["loss"] for s in range(1, 9)] == [
        async_ref["metrics"][s]["loss"] for s in range(1, 9)
    ]
    fs, root = _store(bucket, s3_server), f"{bucket}/ckpt"
    assert fs.cat_file(f"{root}/latest") == b"step_000008"
    assert json.loads(fs.cat_file(f"{root}/step_000004/COMPLETE"))["step"] == 4


def test_preemption_waits_for_the_upload_within_its_bound(async_ref, tmp_path, s3_server):
    """SIGUSR2 at step 5: the run saves, waits for that upload and exits preempted with it
    published. With step 4's upload held up by an outage past checkpoint.preempt_wait_s, it
    exits at the bound, without a new checkpoint, and says which one is latest."""
    cfg = async_ref["cfg"]
    bucket = make_bucket(s3_server)
    proc = avts_train(
        tmp_path, cfg, "run.name=pre", *_s3(bucket, tmp_path), hooks=("--preempt-at", "5")
    )
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr[-3000:]
    step = int(re.search(r"preempted by signal \d+: checkpoint at step (\d+)", proc.stderr)[1])
    fs = _store(bucket, s3_server)
    assert fs.cat_file(f"{bucket}/ckpt/latest") == tag_for(step).encode()

    bucket = make_bucket(s3_server)
    proxy = FaultyS3Proxy(s3_server, fail_every=0).start()
    try:
        proxy.outage("/ckpt/step_000004/", 120.0)
        t0 = time.monotonic()
        proc = avts_train(
            tmp_path, cfg, "run.name=bound", "checkpoint.preempt_wait_s=3",
            *_s3(bucket, tmp_path, proxy.endpoint), hooks=("--preempt-at", "5"),
        )  # fmt: skip
        elapsed = time.monotonic() - t0
    finally:
        proxy.stop()
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr[-3000:]
    assert "no new checkpoint, an upload still in flight after 3s; latest is" in proc.stderr
    assert elapsed < 100  # the outage lasts 120 s: the run did not wait it out
    assert _store(bucket, s3_server).cat_file(f"{bucket}/ckpt/latest") == b"step_000002"
