"""Storage errors that say which thing is wrong: an endpoint that does not answer (with its URL),
a bucket that does not exist, or a key that does not exist. Against a closed loopback port and a
real moto S3 server."""

from __future__ import annotations

import pytest

from avts_dist.cli import main
from avts_dist.data.index import DatasetError, DatasetIndex
from avts_dist.storage import (
    StorageNotFoundError,
    StorageUnreachableError,
    check_bucket,
    get_fs,
)
from tests.fixtures.in_process import avts
from tests.fixtures.s3 import free_port

pytestmark = pytest.mark.s3


@pytest.fixture
def closed_endpoint() -> str:
    """A loopback port nothing listens on (connections are refused at once)."""
    return f"http://127.0.0.1:{free_port()}"


def test_unreachable_endpoint_is_named(closed_endpoint):
    url = "s3://any-bucket/ds"
    fs, path = get_fs(url, {"client_kwargs": {"endpoint_url": closed_endpoint}})
    with pytest.raises(StorageUnreachableError) as err:
        check_bucket(fs, path, url)
    message = str(err.value)
    assert f"storage endpoint {closed_endpoint} is unreachable (for {url})" in message
    assert "does not exist" not in message


def test_missing_bucket_is_not_an_unreachable_endpoint(s3_server):
    url = "s3://no-such-bucket-avts/ds"
    fs, path = get_fs(url)
    with pytest.raises(StorageNotFoundError, match=f"does not exist at {s3_server}"):
        check_bucket(fs, path, url)


def test_missing_key_in_an_existing_bucket(s3_bucket):
    with pytest.raises(DatasetError, match=r"no dataset at .*index.npz not found"):
        DatasetIndex.load(f"s3://{s3_bucket}/nothing-here")


def test_cli_says_unreachable_with_the_url(closed_endpoint, s3_server, capfd):
    # The environment points at the closed port, as a wrong AWS_ENDPOINT_URL would.
    out = avts(["inspect", "s3://some-bucket/ds"], env={"AWS_ENDPOINT_URL": closed_endpoint})
    assert out.returncode == 2
    assert not "".join(capfd.readouterr())  # nothing else reached the file descriptors
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("avts inspect: error: storage endpoint ")
    assert f"{closed_endpoint} is unreachable (for s3://some-bucket/ds)" in lines[0]


def test_storage_error_messages_hold_no_secret(closed_endpoint, capsys):
    secret = "avts-never-print-this-0b5e"
    options = f'{{"key": "AKIAX", "secret": "{secret}", "client_kwargs": {{"endpoint_url": '
    options += f'"{closed_endpoint}"}}}}'
    assert main(["inspect", "s3://b/ds", "--storage-options", options]) == 2
    err = capsys.readouterr().err
    assert "is unreachable" in err and secret not in err
