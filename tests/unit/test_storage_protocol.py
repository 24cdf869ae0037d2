"""One answer to "is this URL remote": ``storage.protocol_of`` and ``storage.is_remote``, which
the checkpoint component, the converters, the readers, evaluation and the launch layer share."""

from __future__ import annotations

import pytest

from avts_dist.storage import get_fs, is_remote, local_path, protocol_of


@pytest.mark.parametrize(
    ("url", "protocol", "remote"),
    [
        ("s3://bucket/ck", "s3", True),
        ("S3://bucket/ck", "s3", True),
        ("s3a://bucket/ck", "s3a", True),
        ("memory://ck/step_000004", "memory", True),
        ("simplecache::s3://bucket/ck", "simplecache", True),
        ("file:///tmp/run/checkpoints", "file", False),
        ("/tmp/run/checkpoints", "file", False),
        ("runs/demo/checkpoints", "file", False),
        ("local:///tmp/run", "local", False),
    ],
)
def test_protocol_of_and_is_remote(url, protocol, remote):
    assert protocol_of(url) == protocol
    assert is_remote(url) is remote


def test_a_remote_url_is_not_a_local_path(tmp_path):
    """memory:// is another filesystem: what it holds is under no local path, so it is remote
    for everyone (it was local to the loader's list and remote to the checkpoints')."""
    fs, path = get_fs("memory://proto/x")
    fs.pipe_file(f"{path}/a", b"1")
    try:
        assert is_remote("memory://proto/x")
        assert not (tmp_path / "proto" / "x" / "a").exists()
    finally:
        fs.rm("/proto", recursive=True)
    assert local_path(f"file://{tmp_path}") == str(tmp_path)
    assert not is_remote(f"file://{tmp_path}") and not is_remote(str(tmp_path))
