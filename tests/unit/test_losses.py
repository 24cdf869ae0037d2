"""AVTS losses in one process: values against hand-written formulas, options, metrics, errors;
and the collectives' single-process behaviour. The multi-process exactness is in
tests/integration/test_gather_exactness.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from avts_dist import distributed
from avts_dist.config import ConfigError, LossConfig, load_config
from avts_dist.curriculum import Curriculum
from avts_dist.losses import AVTSContrastiveLoss, AVTSInfoNCELoss, build_loss, reduce_metrics


def _embs(b=6, dim=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    v, a, n = (torch.randn(b, dim, generator=gen) for _ in range(3))
    kind = torch.tensor([0, 1, 2, 0, 1, 1])[:b]
    return v, a, n, kind


def _hinge(d, eta):
    return max(eta - d, 0.0) ** 2


def test_build_loss_kinds():
    assert isinstance(build_loss(LossConfig()), AVTSContrastiveLoss)
    assert isinstance(build_loss(LossConfig(kind="infonce")), AVTSInfoNCELoss)
    with pytest.raises(ConfigError, match="loss.kind"):
        LossConfig(kind="triplet")


def test_contrastive_matches_the_avts_formula():
    """y d^2 + (1-y) max(eta - d, 0)^2 written out pair by pair."""
    v, a, n, kind = _embs()
    v, a, n = v * 0.3, a * 0.3, n * 0.3  # distances around the margin: both hinge cases occur
    eta, w = 1.2, {"easy": 0.5, "hard": 2.0, "superhard": 3.0}
    cfg = LossConfig(margin=eta, normalize=False, symmetric=True, pos_weight=1.5, weights=w)
    out = build_loss(cfg)(v, a, n, kind)
    b = v.shape[0]
    d = torch.cdist(v.double(), a.double())
    pos = sum(d[i, i].item() ** 2 for i in range(b)) / b
    easy_rows = sum(
        sum(_hinge(d[i, j].item(), eta) for j in range(b) if j != i) / (b - 1) for i in range(b)
    )
    easy_cols = sum(
        sum(_hinge(d[j, i].item(), eta) for j in range(b) if j != i) / (b - 1) for i in range(b)
    )
    d_neg = (v - n).double().norm(dim=1)
    extra = {k: 0.0 for k in ("easy", "hard", "superhard")}
    for i in range(b):
        extra[("easy", "hard", "superhard")[kind[i]]] += _hinge(d_neg[i].item(), eta) / b
    terms = {
        "easy": (easy_rows + easy_cols) / (2 * b) + extra["easy"],
        "hard": extra["hard"],
        "superhard": extra["superhard"],
    }
    expected = 1.5 * pos + sum(w[k] * terms[k] for k in terms)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert out["loss/pos"].item() == pytest.approx(pos, rel=1e-5)
    for k in terms:
        assert out[f"loss/{k}"].item() == pytest.approx(terms[k], rel=1e-5, abs=1e-7)
    assert terms["easy"] > 0 and terms["hard"] > 0  # the check is not vacuous


def test_infonce_equals_clip_cross_entropy():
    v, a, _, _ = _embs(b=5)
    cfg = LossConfig(kind="infonce", temperature=0.1)
    out = build_loss(cfg)(v, a)
    vn, an = F.normalize(v, dim=1), F.normalize(a, dim=1)
    logits = vn @ an.T / 0.1
    labels = torch.arange(5)
    expected = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    # One direction only, with the extra negative appended to the video anchor's row.
    v, a, n, kind = _embs(b=5)
    one = build_loss(LossConfig(kind="infonce", temperature=0.1, symmetric=False))
    vn, an, nn_ = (F.normalize(x, dim=1) for x in (v, a, n))
    row = torch.cat([vn @ an.T, (vn * nn_).sum(1, keepdim=True)], 1) / 0.1
    assert one(v, a, n, kind)["loss"].item() == pytest.approx(
        F.cross_entropy(row, labels).item(), rel=1e-5
    )


def test_kind_weights_and_curriculum_override():
    v, a, n, kind = _embs()
    loss_fn = build_loss(LossConfig(margin=2.0))
    base = loss_fn(v, a, n, kind)
    no_hard = loss_fn(v, a, n, kind, weights={"hard": 0.0})
    assert base["loss/hard"].item() > 0
    assert no_hard["loss"].item() == pytest.approx(
        base["loss"].item() - base["loss/hard"].item(), rel=1e-6
    )
    # The super-hard stage of with_superhard.yaml halves the super-hard term.
    cur = Curriculum(load_config("configs/curriculum/with_superhard.yaml").curriculum)
    cur.update(step=0, epoch=99)
    assert cur.loss_weights == {"superhard": 0.5}
    staged = loss_fn(v, a, n, kind, weights=cur.loss_weights)
    assert staged["loss"].item() == pytest.approx(
        base["loss"].item() - 0.5 * base["loss/superhard"].item(), rel=1e-6
    )
    with pytest.raises(ValueError, match="unknown negative kind"):
        loss_fn(v, a, n, kind, weights={"medium": 1.0})
    # InfoNCE: weight 0 removes those negatives from the partition function.
    nce = build_loss(LossConfig(kind="infonce", symmetric=False))
    hard_only = torch.ones_like(kind)
    with_neg = nce(v, a, n, hard_only)["loss"]
    without = nce(v, a, n, hard_only, weights={"hard": 0.0})["loss"]
    plain = nce(v, a)["loss"]
    assert without.item() == pytest.approx(plain.item(), rel=1e-6)
    assert with_neg.item() > without.item()


def test_hardest_k_takes_the_closest_negatives():
    v, a, _, _ = _embs()
    eta = 3.0
    out = build_loss(
        LossConfig(margin=eta, negatives="hardest_k", num_negatives=1, symmetric=False)
    )(v, a)
    vn, an = F.normalize(v, dim=1), F.normalize(a, dim=1)
    d = torch.cdist(vn, an) + torch.eye(6) * 1e9
    expected = sum(_hinge(d[i].min().item(), eta) for i in range(6)) / 6
    assert out["loss/easy"].item() == pytest.approx(expected, rel=1e-5)


def test_random_k_is_deterministic_per_seed_and_step_and_skips_the_positive():
    loss_fn = build_loss(LossConfig(negatives="random_k", num_negatives=3, seed=5))
    cols = loss_fn._random_cols(step=3, num_global=16, k=3, device="cpu")
    assert torch.equal(cols, loss_fn._random_cols(step=3, num_global=16, k=3, device="cpu"))
    assert not torch.equal(cols, loss_fn._random_cols(step=4, num_global=16, k=3, device="cpu"))
    assert (cols != torch.arange(16)[None, :, None]).all()
    v, a, n, kind = _embs()
    x = loss_fn(v, a, n, kind, step=3)["loss"]
    assert loss_fn(v, a, n, kind, step=3)["loss"].item() == x.item()
    assert any(loss_fn(v, a, n, kind, step=s)["loss"].item() != x.item() for s in range(4, 8))


def test_metrics_per_kind_by_distance_and_by_head():
    v = torch.eye(4, 8)
    a = v.clone()  # positives coincide: in sync
    n = -v  # every extra negative is far
    kind = torch.tensor([0, 1, 1, 2])
    out = build_loss(LossConfig())(v, a, n, kind)
    assert out["acc/pos"].item() == 1.0 and out["dist/pos"].item() < 1e-5
    for k in ("easy", "hard", "superhard"):
        assert out[f"acc/{k}"].item() == 1.0
    assert out["num/neg_easy"].item() == 4 * 3 + 1  # in-batch pairs + one extra easy
    assert out["num/neg_hard"].item() == 2
    assert out["dist/neg_hard"].item() == pytest.approx(2.0)
    # The head's logits decide when given: here it is wrong on the hard negatives.
    sync = torch.tensor([3.0, 3.0, -1.0, 3.0])
    neg_sync = torch.tensor([-2.0, 2.0, 2.0, -2.0])
    head = build_loss(LossConfig())(v, a, n, kind, sync_logit=sync, neg_sync_logit=neg_sync)
    assert head["acc/pos"].item() == 0.75
    assert head["acc/neg_hard"].item() == 0.0 and head["acc/neg_superhard"].item() == 1.0
    assert head["num/neg_easy"].item() == 1  # head mode scores only the extra negatives
    assert head["loss/head"].item() > 0
    assert head["loss"].item() == pytest.approx(out["loss"].item() + head["loss/head"].item())
    reduced = reduce_metrics(head, world_size=1)
    assert reduced["acc/hard"] == pytest.approx(0.5 * (0.75 + 0.0))
    assert reduced["loss"] == pytest.approx(head["loss"].item())


def test_gradients_are_finite_at_zero_distance():
    v = torch.randn(4, 8, requires_grad=True)
    a = v.detach().clone().requires_grad_(True)
    out = build_loss(LossConfig(normalize=False))(v, a, a.detach().clone())
    out["loss"].backward()
    assert torch.isfinite(v.grad).all() and torch.isfinite(a.grad).all()


def test_bad_inputs_are_named():
    loss_fn = build_loss(LossConfig())
    v, a, n, kind = _embs()
    with pytest.raises(ValueError, match="video_emb and audio_emb"):
        loss_fn(v, a[:3])
    with pytest.raises(ValueError, match="neg_kind"):
        loss_fn(v, a, n, kind[:2])
    with pytest.raises(ValueError, match="rank 2 is not in"):
        loss_fn(v, a, rank=2, world_size=2)
    with pytest.raises(ValueError, match="init_distributed"):
        loss_fn(v, a, rank=0, world_size=2)  # no process group: would silently be wrong


def test_collectives_without_and_with_a_group_of_one():
    # Another in-process test (e.g. a single-process training run) may have left a group up.
    pre_existing = distributed.is_dist()
    t = torch.tensor([1.0, 2.0])
    if not pre_existing:
        assert (distributed.get_rank(), distributed.get_world_size()) == (0, 1)
        assert distributed.is_main_process()
        assert torch.equal(distributed.all_reduce_sum(t), t)
        assert distributed.all_ranks_finite(t)
        assert not distributed.all_ranks_finite(torch.tensor([1.0, math.nan]))
        assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    ctx = distributed.init_distributed("gloo")
    try:
        assert (ctx.rank, ctx.world_size) == (0, 1)
        assert distributed.is_dist()
        assert distributed.init_distributed("gloo") == ctx  # idempotent
        x = torch.randn(3, 2, requires_grad=True)
        y = distributed.all_gather_with_grad(x)
        (y * 2).sum().backward()
        assert torch.equal(x.grad, torch.full((3, 2), 2.0))
        assert torch.equal(distributed.all_reduce_max(t), t)
        assert not distributed.all_ranks_finite(torch.tensor([math.inf]))
        distributed.barrier()
    finally:
        if not pre_existing:
            distributed.destroy()
    assert distributed.is_dist() == pre_existing
    with pytest.raises(ValueError, match="backend"):
        distributed.init_distributed("mpi")


def _bce(logit: float, target: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def test_logit_only_mode_is_the_weighted_bce_written_out():
    """Early fusion has no embeddings: each pair's BCE, negatives weighted by kind."""
    sync = torch.tensor([2.0, -1.0, 0.5, 3.0])
    neg = torch.tensor([[-1.0, -2.0], [0.5, -0.5], [-3.0, 1.0], [2.0, -4.0]])  # loader, in-batch
    kind = torch.tensor([0, 1, 1, 2])
    w = {"easy": 0.5, "hard": 2.0, "superhard": 3.0}
    out = build_loss(LossConfig(weights=w, pos_weight=1.5))(
        None, None, None, kind, sync_logit=sync, neg_sync_logit=neg
    )
    b = 4
    pos = sum(_bce(x, 1) for x in sync.tolist()) / b
    kinds = ("easy", "hard", "superhard")
    terms = {k: 0.0 for k in kinds}
    for i in range(b):
        terms[kinds[kind[i]]] += _bce(neg[i, 0].item(), 0) / b
        terms["easy"] += _bce(neg[i, 1].item(), 0) / b
    expected = 1.5 * pos + sum(w[k] * terms[k] for k in kinds)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)
    assert out["loss/pos"].item() == pytest.approx(pos, rel=1e-6)
    for k in kinds:
        assert out[f"loss/{k}"].item() == pytest.approx(terms[k], rel=1e-6)
    assert out["acc/pos"].item() == 0.75
    # easy: loader col of clip 0 (rejected) + 4 in-batch (3 rejected); hard: clips 1, 2 (1 of 2).
    counts = {k: (out[f"num/neg_{k}"].item(), out[f"acc/neg_{k}"].item()) for k in kinds}
    assert counts == {"easy": (5, pytest.approx(0.8)), "hard": (2, 0.5), "superhard": (1, 0.0)}
    reduced = reduce_metrics(out, world_size=1)
    assert reduced["acc/easy"] == pytest.approx(0.5 * (0.75 + 0.8))
    assert "dist/pos" not in reduced


def test_logit_only_mode_on_n_ranks_equals_one_process():
    """Local sums over the local batch: the mean over ranks is the global loss, and gradients
    averaged over ranks are the global gradients (no gather is involved)."""
    gen = torch.Generator().manual_seed(0)
    sync = torch.randn(8, generator=gen, requires_grad=True)
    neg = torch.randn(8, 2, generator=gen, requires_grad=True)
    kind = torch.tensor([0, 1, 2, 0, 1, 1, 0, 2])
    loss_fn = build_loss(LossConfig(weights={"hard": 2.0}))
    whole = loss_fn(None, None, None, kind, sync_logit=sync, neg_sync_logit=neg)["loss"]
    (g_sync, g_neg) = torch.autograd.grad(whole, (sync, neg))
    halves = [
        loss_fn(
            None, None, None, kind[sl], rank=r, world_size=2, sync_logit=sync[sl],
            neg_sync_logit=neg[sl],
        )["loss"]
        for r, sl in enumerate((slice(0, 4), slice(4, 8)))
    ]  # fmt: skip
    assert (halves[0] + halves[1]).item() / 2 == pytest.approx(whole.item(), rel=1e-6)
    h_sync, h_neg = torch.autograd.grad((halves[0] + halves[1]) / 2, (sync, neg))
    torch.testing.assert_close(h_sync, g_sync)
    torch.testing.assert_close(h_neg, g_neg)


def test_logit_only_mode_errors_are_named():
    loss_fn = build_loss(LossConfig())
    with pytest.raises(ValueError, match="embeddings .* or sync_logit"):
        loss_fn(None, None)
    with pytest.raises(ValueError, match="both be given, or both be None"):
        loss_fn(torch.randn(2, 4), None, sync_logit=torch.zeros(2))
    with pytest.raises(ValueError, match="neg_kind"):
        loss_fn(None, None, None, torch.zeros(3, dtype=torch.long), sync_logit=torch.zeros(2))
    with pytest.raises(ValueError, match="rank 2 is not in"):
        loss_fn(None, None, rank=2, world_size=2, sync_logit=torch.zeros(2))


def test_random_k_draws_without_replacement_and_any_rank_draws_its_rows_alike():
    loss_fn = build_loss(LossConfig(negatives="random_k", num_negatives=7, seed=2))
    cols = loss_fn._random_cols(step=11, num_global=8, k=7, device="cpu")
    assert cols.shape == (2, 8, 7)
    # k = B - 1: every other column exactly once, per anchor and direction.
    for d in range(2):
        for row in range(8):
            assert sorted(cols[d, row].tolist()) == [c for c in range(8) if c != row]
    few = loss_fn._random_cols(step=11, num_global=64, k=20, device="cpu")
    assert all(len(set(r.tolist())) == 20 for r in few.reshape(-1, 20))
    # A rank's slice of the global anchors is what one process draws for them.
    local = loss_fn._random_cols(step=11, num_global=64, k=20, device="cpu", rows=range(16, 32))
    assert torch.equal(local, few[:, 16:32])
