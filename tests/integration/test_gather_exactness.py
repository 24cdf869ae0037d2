"""World size N (real gloo processes) equals one process on the same global batch.

For each world size one process group is started (torch.multiprocessing spawn) and every check
runs inside it: for several loss set-ups, each rank computes its loss on its slice of a fixed
global batch through a small two-encoder model (+ a fusion head), backpropagates, and averages
gradients the way DeepSpeed/DDP do (all-reduce sum / N; once through real DDP too). Rank 0 also
computes the single-process reference on the whole batch and records the largest differences.
The same harness with the naive gather (no gradient through other ranks' rows) and with a gather
whose backward divides by N must show differences well above the tolerance.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from avts_dist.distributed import free_port
from tests.fixtures.gloo_group import start_ranks

pytestmark = pytest.mark.slow

GLOBAL_BATCH = 12  # divisible by 2 and 3
TOL = 1e-5

SCENARIOS: dict[str, dict] = {
    "contrastive_all": dict(kind="contrastive", margin=1.5),
    "contrastive_all_ddp": dict(kind="contrastive", margin=1.5),
    "contrastive_hardest_k": dict(
        kind="contrastive", margin=1.5, negatives="hardest_k", num_negatives=3, pos_weight=2.0
    ),
    "contrastive_random_k_raw": dict(
        kind="contrastive", margin=4.0, negatives="random_k", num_negatives=3, normalize=False
    ),
    "contrastive_one_way_head": dict(kind="contrastive", margin=1.5, symmetric=False),
    "infonce_all": dict(kind="infonce", temperature=0.2),
    "infonce_hardest_k": dict(kind="infonce", negatives="hardest_k", num_negatives=4),
    "infonce_random_k_head": dict(kind="infonce", negatives="random_k", num_negatives=2),
}
# Scenarios that also train the fusion head (sync logits for positives and extra negatives).
WITH_HEAD = {"contrastive_one_way_head", "infonce_random_k_head"}
# The curriculum's per-kind override, to exercise weights= on the same path.
WEIGHTS = {"easy": 0.75, "hard": 1.5, "superhard": 0.5}


class TinyAV(torch.nn.Module):
    """Two linear encoders and a fusion head: enough to have parameters on every path."""

    def __init__(self) -> None:
        super().__init__()
        self.video = torch.nn.Sequential(
            torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8)
        )
        self.audio = torch.nn.Sequential(
            torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8)
        )
        self.fusion = torch.nn.Linear(16, 1)

    def forward(self, video_BF, audio_BF, neg_audio_BF):
        v, a, n = self.video(video_BF), self.audio(audio_BF), self.audio(neg_audio_BF)
        return v, a, n, self.fusion(torch.cat([v, a], 1)), self.fusion(torch.cat([v, n], 1))


def _batch():
    gen = torch.Generator().manual_seed(1234)
    return (
        torch.randn(GLOBAL_BATCH, 12, generator=gen),
        torch.randn(GLOBAL_BATCH, 10, generator=gen),
        torch.randn(GLOBAL_BATCH, 10, generator=gen),
        torch.randint(0, 3, (GLOBAL_BATCH,), generator=gen),
    )


def _run(cfg_kwargs, name, rank, world_size, rows, ddp=False):
    """Loss output and per-parameter gradients (averaged over ranks as DeepSpeed does)."""
    import torch.distributed as dist

    from avts_dist.config import LossConfig
    from avts_dist.losses import build_loss

    torch.manual_seed(0)
    model = TinyAV()
    # find_unused_parameters: the fusion head only gets gradients in the head scenarios.
    net = (
        torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        if ddp
        else model
    )
    video, audio, neg, kind = (t[rows] for t in _batch())
    v, a, n, s_pos, s_neg = net(video, audio, neg)
    head = name in WITH_HEAD
    loss_fn = build_loss(LossConfig(**cfg_kwargs))
    out = loss_fn(
        v, a, n, kind, rank=rank, world_size=world_size, weights=WEIGHTS, step=7,
        sync_logit=s_pos if head else None, neg_sync_logit=s_neg if head else None,
    )  # fmt: skip
    out["loss"].backward()
    grads = {}
    for pname, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if world_size > 1 and not ddp:
            g = g.clone()
            dist.all_reduce(g)
            g /= world_size
        grads[pname] = g
    return out, grads


def _scaled_gather(local_BD):
    """The pitfall: a gather whose backward divides by the world size."""
    import torch.distributed as dist

    class Scaled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, x.contiguous())
            return torch.cat(parts)

        @staticmethod
        def backward(ctx, g):
            g = g.clone()
            dist.all_reduce(g)
            b, r = g.shape[0] // dist.get_world_size(), dist.get_rank()
            return g[r * b : (r + 1) * b] / dist.get_world_size()

    return Scaled.apply(local_BD)


def _worker(rank, world_size, port, out_path):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )  # fmt: skip
    torch.set_num_threads(1)
    import avts_dist.losses.avts as avts_mod
    from avts_dist.distributed import destroy, init_distributed
    from avts_dist.losses import reduce_metrics

    ctx = init_distributed("gloo", timeout_s=60)
    assert (ctx.rank, ctx.world_size) == (rank, world_size)
    b = GLOBAL_BATCH // world_size
    local = slice(rank * b, (rank + 1) * b)
    results = {}

    def compare(name, cfg_kwargs, variant="exact"):
        out, grads = _run(cfg_kwargs, name, rank, world_size, local, ddp=name.endswith("_ddp"))
        reduced = reduce_metrics(out, world_size)
        if rank != 0:
            return
        ref_out, ref_grads = _run(cfg_kwargs, name, 0, 1, slice(None))
        ref_reduced = reduce_metrics(ref_out, 1)
        results[f"{variant}/{name}"] = {
            "loss_diff": abs(reduced["loss"] - ref_reduced["loss"]),
            "metric_diffs": {k: abs(reduced[k] - ref_reduced[k]) for k in ref_reduced},
            "grad_diffs": {k: (grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads},
            "grad_norm": sum(g.norm().item() for g in ref_grads.values()),
        }

    for name, kwargs in SCENARIOS.items():
        compare(name, kwargs)
    base = SCENARIOS["contrastive_all"]
    compare("contrastive_all", {**base, "gather_with_grad": False}, variant="naive")
    compare("infonce_all", {**SCENARIOS["infonce_all"], "gather_with_grad": False}, variant="naive")
    original = avts_mod.all_gather_with_grad
    avts_mod.all_gather_with_grad = _scaled_gather
    try:
        compare("contrastive_all", base, variant="scaled")
        compare("infonce_all", SCENARIOS["infonce_all"], variant="scaled")
    finally:
        avts_mod.all_gather_with_grad = original
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    destroy()


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"world{n}")
def exactness(request, tmp_path_factory):
    world_size = request.param
    out_path = tmp_path_factory.mktemp(f"exact{world_size}") / "results.json"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    start_ranks(_worker, (world_size, free_port(), str(out_path)), world_size)
    return json.loads(out_path.read_text())


def test_loss_and_every_gradient_match_one_process(exactness):
    exact = {k: v for k, v in exactness.items() if k.startswith("exact/")}
    assert len(exact) == len(SCENARIOS)
    for name, r in exact.items():
        assert r["loss_diff"] < TOL, (name, r["loss_diff"])
        assert len(r["grad_diffs"]) == 10  # 4 + 4 encoder tensors + fusion weight and bias
        worst = max(r["grad_diffs"].items(), key=lambda kv: kv[1])
        assert worst[1] < TOL, (name, worst)
        # Gradients are not trivially zero (the margins keep every hinge active).
        assert r["grad_norm"] > 1e-2, name


def test_logged_metrics_are_global_batch_values(exactness):
    for name, r in exactness.items():
        if not name.startswith("exact/"):
            continue
        assert {"loss", "acc/pos", "acc/easy", "dist/pos", "dist/neg"} <= set(r["metric_diffs"])
        worst = max(r["metric_diffs"].items(), key=lambda kv: kv[1])
        assert worst[1] < TOL, (name, worst)


@pytest.mark.parametrize("variant", ["naive", "scaled"])
def test_broken_gathers_fail_the_same_check(exactness, variant):
    for loss in ("contrastive_all", "infonce_all"):
        r = exactness[f"{variant}/{loss}"]
        # The forward pass is identical: only gradients betray the bug.
        assert r["loss_diff"] < TOL
        assert max(r["grad_diffs"].values()) > 100 * TOL, (variant, loss, r["grad_diffs"])
