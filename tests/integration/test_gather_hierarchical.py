"""The hierarchical gather (``loss.gather=hierarchical``) equals the flat one.

One real gloo group of 4 processes laid out as 2 "nodes" x 2 local ranks (``LOCAL_RANK``,
``LOCAL_WORLD_SIZE`` as a multi-node launcher sets them). Inside it: the two-level gather's
output equals the flat all-gather bitwise; for the AVTS contrastive loss, the AVTS InfoNCE and
the video-only InfoNCE, the loss and the gradients that reach this rank's embeddings equal the
flat path's; and ``gather_groups`` falls back to the flat gather at one node or one rank per
node, and refuses a layout that is not equal nodes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from avts_dist.config import LossConfig
from avts_dist.distributed.collectives import _layout_error
from tests.fixtures.gloo_group import run_in_group

WORLD, LOCAL_WORLD = 4, 2
ROWS, DIM = 3, 6
GRAD_TOL = 1e-6

LOSSES = {
    "contrastive": dict(kind="contrastive", margin=1.5),
    "contrastive_hardest_k": dict(kind="contrastive", negatives="hardest_k", num_negatives=3),
    "infonce": dict(kind="infonce", temperature=0.2),
    "video_ssl": dict(kind="infonce"),
}


def _global_embeddings(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(WORLD * ROWS, DIM, generator=gen), torch.randn(
        WORLD * ROWS, DIM, generator=gen
    )


def _loss_and_grads(loss_fn, name: str, rank: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    first, second = (
        t[rank * ROWS : (rank + 1) * ROWS].clone().requires_grad_() for t in _global_embeddings(7)
    )
    if name == "video_ssl":
        out = loss_fn(first, second, rank=rank, world_size=WORLD)
    else:
        out = loss_fn(first, second, rank=rank, world_size=WORLD, step=0)
    out["loss"].backward()
    return out["loss"].detach(), [first.grad, second.grad]


def _compare(rank: int, world_size: int) -> dict:
    from avts_dist.distributed import collectives as C
    from avts_dist.losses import build_loss

    ctx = C.init_distributed("gloo")
    groups = C.gather_groups("hierarchical", ctx)
    auto = C.gather_groups("auto", ctx)
    result: dict = {
        "context": [ctx.local_rank, ctx.local_world_size, ctx.num_nodes],
        "groups": [groups.node, groups.local_rank, groups.num_nodes, groups.local_world_size],
        "auto_is_hierarchical": auto is not None,
    }
    # Forward: distinct rows per rank, so any misplaced block shows.
    local = torch.arange(ROWS * DIM, dtype=torch.float32).reshape(ROWS, DIM) + 100.0 * rank
    flat_out = C.all_gather_with_grad(local)
    hier_out = C.hierarchical_all_gather_with_grad(local, groups)
    result["forward_bitwise"] = bool(torch.equal(flat_out, hier_out))
    result["forward_rank_order"] = bool(
        torch.equal(hier_out[rank * ROWS : (rank + 1) * ROWS], local)
    )
    for name, kwargs in LOSSES.items():
        cfg = LossConfig(**kwargs)
        objective = "video_ssl" if name == "video_ssl" else "avts"
        flat_loss, flat_grads = _loss_and_grads(build_loss(cfg, objective), name, rank)
        hier_loss, hier_grads = _loss_and_grads(build_loss(cfg, objective, groups), name, rank)
        diffs = [(f - h).abs().max() for f, h in zip(flat_grads, hier_grads, strict=True)]
        # Ranks exchange their largest difference: rank 0 reports the worst over the world.
        worst = C.all_reduce_max(torch.stack(diffs).max().reshape(1)).item()
        bitwise = all(torch.equal(f, h) for f, h in zip(flat_grads, hier_grads, strict=True))
        result[name] = {
            "loss_equal": bool(torch.equal(flat_loss, hier_loss)),
            "grad_max_diff": worst,
            "grad_bitwise": bool(
                C.all_reduce_sum(torch.tensor([0.0 if bitwise else 1.0])).item() == 0
            ),
            "grad_norm": float(torch.cat([g.flatten() for g in flat_grads]).norm()),
        }
    # Fall-backs to the flat gather, decided the same way on every rank.
    one_node = dataclasses.replace(ctx, local_rank=rank, local_world_size=WORLD)
    one_per_node = dataclasses.replace(ctx, local_rank=0, local_world_size=1)
    result["fallback"] = {
        mode: [C.gather_groups(mode, one_node) is None, C.gather_groups(mode, one_per_node) is None]
        for mode in ("hierarchical", "auto")
    }
    uneven = dataclasses.replace(ctx, local_world_size=3)
    result["uneven_auto_is_flat"] = C.gather_groups("auto", uneven) is None
    try:
        C.gather_groups("hierarchical", uneven)
        result["uneven_error"] = ""
    except ValueError as exc:
        result["uneven_error"] = str(exc)
    return result


@pytest.fixture(scope="module")
def compared() -> dict:
    return run_in_group(_compare, WORLD, local_world_size=LOCAL_WORLD)


@pytest.mark.slow
def test_groups_follow_the_node_layout(compared):
    # Rank 0 reports: local rank 0 of 2 on node 0 of 2.
    assert compared["context"] == [0, LOCAL_WORLD, WORLD // LOCAL_WORLD]
    assert compared["groups"] == [0, 0, WORLD // LOCAL_WORLD, LOCAL_WORLD]
    assert compared["auto_is_hierarchical"]


@pytest.mark.slow
def test_forward_equals_flat_gather_bitwise(compared):
    assert compared["forward_bitwise"]
    assert compared["forward_rank_order"]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_and_gradients_equal_flat_gather(compared, name):
    got = compared[name]
    assert got["loss_equal"]
    assert got["grad_norm"] > 0  # gradients that are all zero would compare equal trivially
    assert got["grad_max_diff"] <= GRAD_TOL, got


@pytest.mark.slow
def test_falls_back_to_flat_at_one_node_or_one_rank_per_node(compared):
    assert compared["fallback"] == {"hierarchical": [True, True], "auto": [True, True]}


@pytest.mark.slow
def test_uneven_nodes_refused_for_hierarchical_and_flat_for_auto(compared):
    assert compared["uneven_auto_is_flat"]
    assert "loss.gather=hierarchical" in compared["uneven_error"]
    assert "not a multiple of LOCAL_WORLD_SIZE=3" in compared["uneven_error"]


def test_layout_error_names_the_problem():
    assert _layout_error([(r, r % 2, 2) for r in range(4)]) is None
    assert "different LOCAL_WORLD_SIZE" in _layout_error(
        [(0, 0, 2), (1, 1, 2), (2, 0, 1), (3, 0, 1)]
    )
    assert "LOCAL_RANK = RANK mod 2" in _layout_error([(0, 0, 2), (1, 1, 2), (2, 1, 2), (3, 0, 2)])


def test_hierarchical_needs_gather_with_grad():
    with pytest.raises(ValueError, match="loss.gather"):
        LossConfig(gather="hierarchical", gather_with_grad=False)
    assert LossConfig(gather="auto", gather_with_grad=False).gather == "auto"
    with pytest.raises(ValueError, match="loss.gather"):
        LossConfig(gather="tree")
