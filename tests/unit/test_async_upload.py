"""The background checkpoint upload (``checkpoint.async_upload``), on the moto S3 server: ranks
meet through markers on the store, never a collective; rank 0 publishes only once every rank's
upload is verified; at most one upload in flight; an outage is retried and reported."""

from __future__ import annotations

import ast
import json
import logging
import threading
import time
from pathlib import Path

import pytest
import torch

from avts_dist.config import REPO_ROOT, CheckpointConfig
from avts_dist.storage import get_fs
from avts_dist.train.checkpoint.save import CheckpointManager
from avts_dist.train.checkpoint.storage import UPLOADS, RemoteStorage
from avts_dist.train.checkpoint.upload import BackgroundUploader, UploadJob
from tests.fixtures.faulty_s3 import FaultyS3Proxy


def _staged(root: Path, rank: int, size: int) -> tuple[Path, dict[str, torch.Tensor]]:
    """Where a save stages, and one rank's host copy of its state."""
    return root / ".tmp-step_000002", {f"shard_rank_{rank}.pt": torch.full((size,), rank)}


def _uploader(storage, rank: int, world_size: int, published: list, **kw) -> BackgroundUploader:
    def publish(job: UploadJob) -> str | None:
        published.append((job.dest, time.monotonic()))
        storage.publish(job.dest, job.meta, None)
        return None

    kw.setdefault("retries", 2)
    return BackgroundUploader(
        storage, rank=rank, world_size=world_size, timeout_s=60, publish=publish,
        on_event=lambda name, step: None, **kw,
    )  # fmt: skip


def _storage(url: str, tmp_path: Path, **options) -> RemoteStorage:
    return RemoteStorage(CheckpointConfig(dir=url, storage_options=options), tmp_path / "stage")


def test_upload_module_touches_no_process_group():
    """The thread's code imports nothing that could reach the training group."""
    src = (REPO_ROOT / "avts_dist/train/checkpoint/upload.py").read_text()
    imported = [
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(ast.parse(src))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    ]
    assert imported and not [m for m in imported if "distributed" in m or "deepspeed" in m]


def test_rank_zero_publishes_only_after_every_rank_marked(s3_bucket, tmp_path):
    """Two ranks' uploaders (one process, as two nodes would): rank 0's own upload ends first,
    and still nothing is published until rank 1's marker is on the store."""
    url = f"s3://{s3_bucket}/ck"
    storage = _storage(url, tmp_path)
    published: list = []
    zero, one = (_uploader(storage, r, 2, published) for r in (0, 1))
    tmp, snap0 = _staged(tmp_path / "stage", 0, 1000)
    _, snap1 = _staged(tmp_path / "stage", 1, 3000)
    meta = {"step": 2, "format_version": 1, "files": {}}
    zero.submit(UploadJob(2, tmp, "step_000002", "step_000002-a", snap0, meta=meta))
    time.sleep(1.5)
    fs, root = get_fs(url)
    assert zero.in_flight and not published
    assert not fs.exists(f"{root}/step_000002/COMPLETE") and not fs.exists(f"{root}/latest")
    marked_at = time.monotonic()
    one.submit(UploadJob(2, tmp, "step_000002", "step_000002-a", snap1))
    assert one.wait(30) and zero.wait(30)
    assert published and published[0][1] >= marked_at
    fs.invalidate_cache()
    assert fs.cat_file(f"{root}/latest") == b"step_000002"
    manifest = json.loads(fs.cat_file(f"{root}/step_000002/COMPLETE"))["files"]
    # The manifest comes from the markers: each rank's files with the size and sha256 written.
    assert sorted(manifest) == ["shard_rank_0.pt", "shard_rank_1.pt"]
    for name, entry in manifest.items():
        assert entry["size"] == (tmp / name).stat().st_size and len(entry["sha256"]) == 64
    assert not fs.exists(f"{root}/{UPLOADS}/step_000002-a")  # markers dropped once published
    assert zero.stats.num_waits == 1 and zero.stats.num_failed == 0


def test_a_failed_rank_keeps_the_save_unpublished(s3_bucket, tmp_path, caplog):
    """A rank whose upload cannot be verified says so in its marker: rank 0 does not publish."""
    url = f"s3://{s3_bucket}/ck"
    storage = _storage(url, tmp_path)
    published: list = []
    zero, one = (_uploader(storage, r, 2, published, retries=0) for r in (0, 1))
    tmp, snap0 = _staged(tmp_path / "stage", 0, 100)
    _, snap1 = _staged(tmp_path / "stage", 1, 100)
    meta = {"step": 2, "format_version": 1, "files": {}}
    differs = lambda records: "differs"  # noqa: E731
    one.submit(UploadJob(2, tmp, "step_000002", "s-b", snap1, read_back=differs))
    zero.submit(UploadJob(2, tmp, "step_000002", "s-b", snap0, meta=meta))
    with caplog.at_level(logging.WARNING, "avts.train"):
        assert one.wait(30) and zero.wait(30)
    assert not published and zero.stats.num_failed == 1
    assert "rank 1: upload failed 1 times, last: differs" in zero.stats.last_error
    assert "checkpoint step_000002 not published: rank 1" in caplog.text
    fs, root = get_fs(url)
    assert not fs.exists(f"{root}/latest")


def test_an_outage_is_retried_reported_and_the_save_published(s3_server, tmp_path, caplog):
    """The endpoint refuses writes for 3 s: the upload is retried (logged, counted) and then
    published; the caller was never blocked."""
    from tests.fixtures.s3 import make_bucket

    bucket = make_bucket(s3_server)
    proxy = FaultyS3Proxy(s3_server, fail_every=0).start()
    try:
        url = f"s3://{bucket}/ck"
        # One botocore attempt per call: the outage reaches our retry, not botocore's.
        options = {
            "client_kwargs": {"endpoint_url": proxy.endpoint},
            "config_kwargs": {"retries": {"max_attempts": 1}},
            "skip_instance_cache": True,
        }
        storage = _storage(url, tmp_path, **options)
        published: list = []
        up = _uploader(storage, 0, 1, published, retries=4)
        tmp, snap = _staged(tmp_path / "stage", 0, 2000)
        meta = {"step": 2, "format_version": 1, "files": {}}
        proxy.outage("/ck/", 3.0)
        t0 = time.perf_counter()
        with caplog.at_level(logging.WARNING, "avts.train"):
            up.submit(UploadJob(2, tmp, "step_000002", "s-c", snap, meta=meta))
            assert time.perf_counter() - t0 < 0.5  # submit returns at once
            assert up.wait(60)
        assert proxy.outage_refused > 0 and up.stats.num_retries >= 1
        assert "upload to s3://" in caplog.text and "retrying in" in caplog.text
        assert published and up.stats.num_failed == 0
        fs, root = get_fs(url, options)
        assert fs.cat_file(f"{root}/latest") == b"step_000002"
    finally:
        proxy.stop()


def test_one_upload_in_flight(tmp_path):
    up = BackgroundUploader(
        None, rank=0, world_size=1, retries=0, timeout_s=1, publish=lambda job: None,
        on_event=lambda name, step: None,
    )  # fmt: skip
    gate = threading.Event()
    up._thread = threading.Thread(target=gate.wait)
    up._thread.start()
    with pytest.raises(RuntimeError, match="in flight"):
        up.submit(UploadJob(1, tmp_path, "step_000001", "x", {}))
    assert not up.wait(0.05) and up.stats.num_waits == 1
    gate.set()
    assert up.wait(5) and up.stats.num_waits == 2


def test_async_upload_is_off_for_a_local_dir(tmp_path):
    cfg = CheckpointConfig(dir=str(tmp_path / "ck"), async_upload=True)
    manager = CheckpointManager(cfg, run_dir=tmp_path, rank=0, world_size=1)
    assert manager.uploader is None and manager.finish(0)


@pytest.mark.parametrize(
    ("key", "value"), [("upload_retries", -1), ("upload_timeout_s", 0), ("preempt_wait_s", -1)]
)
def test_bad_upload_settings_name_the_field(key, value):
    with pytest.raises(ValueError, match=f"checkpoint.{key}"):
        CheckpointConfig(**{key: value})
