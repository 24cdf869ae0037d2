"""avts_dist.extras: a package checked without importing it, and which ranks import mlflow."""

from __future__ import annotations

import sys

import pytest

from avts_dist.extras import MissingPackageError, installed, require
from avts_dist.train.run import imports_mlflow_here


def test_installed_finds_without_importing(monkeypatch):
    monkeypatch.delitem(sys.modules, "tabnanny", raising=False)  # stdlib, imported by nothing here
    assert installed("tabnanny")
    assert "tabnanny" not in sys.modules
    require("tabnanny", needed_by="x", fix="y", load=False)
    assert "tabnanny" not in sys.modules
    assert not installed("avts_no_such_package")


def test_a_blocked_package_is_missing_with_or_without_loading(monkeypatch):
    monkeypatch.setitem(sys.modules, "tabnanny", None)  # Python's "not importable" marker
    assert not installed("tabnanny")
    for load in (True, False):
        with pytest.raises(MissingPackageError) as err:
            require("tabnanny", needed_by="tracking.enabled=true", fix="pip install it", load=load)
        msg = str(err.value)
        assert msg.startswith("tracking.enabled=true needs the tabnanny package")
        assert msg.endswith("; pip install it") and "\n" not in msg
    with pytest.raises(MissingPackageError, match="No module named 'avts_no_such_package'"):
        require("avts_no_such_package", needed_by="x", fix="y", load=False)


@pytest.mark.parametrize(
    ("env", "imports"),
    [
        ({}, True),  # a single process
        ({"LOCAL_RANK": "0", "RANK": "3"}, True),  # another node's first rank: system metrics
        ({"LOCAL_RANK": "1", "RANK": "1"}, False),
        ({"SLURM_LOCALID": "0", "SLURM_PROCID": "4"}, True),  # bare srun, before RANK is derived
        ({"SLURM_LOCALID": "2", "SLURM_PROCID": "2"}, False),
        ({"LOCAL_RANK": "1", "SLURM_LOCALID": "0"}, False),  # the launcher's variable wins
    ],
)
def test_only_each_nodes_first_rank_imports_mlflow(env, imports):
    assert imports_mlflow_here(env) is imports
