"""The node id of system metrics: none on one node (MLflow's own names), node<k> on several."""

from __future__ import annotations

import pytest

from avts_dist.tracking.system import node_id_for


@pytest.mark.parametrize(
    "env, rank, world_size, expected",
    [
        ({}, 0, 1, None),
        ({"LOCAL_WORLD_SIZE": "2"}, 1, 2, None),  # 2 ranks on one node
        ({"LOCAL_WORLD_SIZE": "2"}, 2, 4, "node1"),  # from the rank
        ({"LOCAL_WORLD_SIZE": "8", "SLURM_NODEID": "5"}, 40, 64, "node5"),
        ({"LOCAL_WORLD_SIZE": "8", "GROUP_RANK": "3", "SLURM_NODEID": "5"}, 24, 64, "node3"),
    ],
)
def test_node_id_for(monkeypatch, env, rank, world_size, expected):
    for key in ("LOCAL_WORLD_SIZE", "GROUP_RANK", "SLURM_NODEID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert node_id_for(rank, world_size) == expected
