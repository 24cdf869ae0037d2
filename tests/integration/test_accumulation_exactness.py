"""Gradient accumulation with the global batch's negatives equals one big batch, through real
DeepSpeed engines in real gloo process groups.

For world sizes 1 and 2 one process group is started (torch.multiprocessing spawn). In it, for
the AVTS losses (contrastive, InfoNCE) and the video-only InfoNCE (``train.objective=video_ssl``),
at k = 2 and 4 micro-batches and ZeRO stages 0-3 (each case one stage, every stage covered at
every world size), each rank back-propagates its batch through
``train.accumulation.accumulate_gradients`` and a DeepSpeed engine, then takes the optimizer step.
The reference, in the same process, forwards the k micro-batches with autograd one after the
other (BatchNorm statistics per micro-batch, as in training), concatenates their outputs,
back-propagates one loss over them and averages gradients over ranks as DeepSpeed does. The
models have BatchNorm and dropout, so the running statistics and the replayed random state are
checked too. The same harness with ``loss.negatives_scope=micro`` must differ well above the
tolerance, and a non-finite loss must leave every weight as it was.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from tests.fixtures.gloo_group import run_in_group

pytestmark = pytest.mark.slow

TOL = 1e-5
MICRO = 3  # rows per micro-batch
LR = 0.5
LOSSES = {
    "contrastive": dict(kind="contrastive", margin=1.5),
    "contrastive_random_k": dict(
        kind="contrastive", margin=1.5, negatives="random_k", num_negatives=4
    ),
    "infonce": dict(kind="infonce", temperature=0.2),
    "video_ssl": dict(video_ssl_temperature=0.2),
}
# (loss, k) pairs; the ZeRO stage of each case rotates with the world size.
CASES = [("contrastive", 2), ("infonce", 4), ("video_ssl", 2), ("contrastive", 4)]
CASES += [("infonce", 2), ("video_ssl", 4), ("contrastive_random_k", 2)]


def _mlp(n_in: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(n_in, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 8)
    )


class TinyAV(nn.Module):
    """The AVTS model's interface (a dict of embeddings; positives and negatives of the audio
    net in one BatchNorm batch) at the size of a test, with dropout to draw random numbers."""

    def __init__(self) -> None:
        super().__init__()
        self.video, self.audio = _mlp(12, 0.2), _mlp(10, 0.0)

    def forward(self, video_BF, audio_BF, neg_audio_BF):
        both = self.audio(torch.cat([audio_BF, neg_audio_BF]))
        b = video_BF.shape[0]
        return {"video_emb": self.video(video_BF), "audio_emb": both[:b], "neg_audio_emb": both[b:]}


class TinyViews(nn.Module):
    """The video_ssl model's interface: both views in one pass."""

    def __init__(self) -> None:
        super().__init__()
        self.video = _mlp(12, 0.2)

    def forward(self, view1_BF, view2_BF):
        both = self.video(torch.cat([view1_BF, view2_BF]))
        b = view1_BF.shape[0]
        return {"view1_emb": both[:b], "view2_emb": both[b:]}


def _global_batch(rows: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    return {
        "video": torch.randn(rows, 12, generator=gen),
        "video2": torch.randn(rows, 12, generator=gen),
        "audio": torch.randn(rows, 10, generator=gen),
        "neg_audio": torch.randn(rows, 10, generator=gen),
        "neg_kind": torch.randint(0, 3, (rows,), generator=gen),
    }


def _case(loss_name, k, stage, rank, world_size, scope="global", nan=False):
    """Largest differences between the engine's accumulated step and the one-batch reference."""
    import deepspeed.utils
    import torch.distributed as dist

    from avts_dist.config import DeepSpeedConfig, LossConfig, OptimConfig
    from avts_dist.distributed.engine import build_ds_config, initialize_engine, optimizer_step
    from avts_dist.losses import build_loss
    from avts_dist.train.accumulation import accumulate_gradients
    from avts_dist.train.batch import micro_batches
    from avts_dist.train.objectives import loss_on_outputs, model_outputs

    objective = "video_ssl" if loss_name == "video_ssl" else "avts"
    b = k * MICRO
    batch = {key: t[rank * b : (rank + 1) * b] for key, t in _global_batch(b * world_size).items()}
    if objective == "video_ssl":
        batch = {key: batch[key] for key in ("video", "video2")}
    loss_fn = build_loss(LossConfig(**LOSSES[loss_name]), objective)
    torch.manual_seed(0)
    model = TinyViews() if objective == "video_ssl" else TinyAV()
    reference = copy.deepcopy(model)
    optim = OptimConfig(name="sgd", lr=LR, weight_decay=0.0, schedule="constant", grad_clip=0.0)
    ds_config = build_ds_config(
        DeepSpeedConfig(zero_stage=stage, grad_accum_steps=k, backend="gloo"), optim,
        global_batch_size=b * world_size, world_size=world_size, total_steps=10, use_cuda=False,
    )  # fmt: skip
    engine = initialize_engine(model, ds_config, backend="gloo")
    calls = []

    def on_loss(loss):  # the first loss of the step (the first micro-batch's with micro)
        calls.append(1)
        return loss * math.nan if len(calls) == 1 else loss

    torch.manual_seed(7)
    acc = accumulate_gradients(
        engine, loss_fn, micro_batches(batch, k), objective=objective, rank=rank,
        world_size=world_size, negatives_scope=scope, on_loss=on_loss if nan else None, step=3,
    )  # fmt: skip
    names = [n for n, _ in engine.module.named_parameters()]
    # ZeRO-0 keeps plain .grad and weights; ZeRO >= 1 partitions them.
    full_grad, full_param = (
        deepspeed.utils.safe_get_full_grad,
        deepspeed.utils.safe_get_full_fp32_param,
    )
    if stage == 0:
        full_grad, full_param = (lambda p: p.grad), (lambda p: p.detach())
    grads = {n: full_grad(p).clone() for n, p in engine.module.named_parameters()}
    skip = bool(acc.nonfinite.item())
    applied = optimizer_step(engine, skip=skip)
    params = {n: full_param(p).clone() for n, p in engine.module.named_parameters()}
    stats = {n: t.clone() for n, t in engine.module.named_buffers()}
    engine.destroy()

    torch.manual_seed(7)
    parts = micro_batches(batch, k)
    outs = [model_outputs(reference, part, objective=objective) for part in parts]
    whole = {key: torch.cat([o[key] for o in outs]) for key in outs[0]}
    terms = loss_on_outputs(
        loss_fn, whole, batch, objective=objective, rank=rank, world_size=world_size, step=3
    )
    terms["loss"].backward()
    ref_grads, ref_params = {}, {}
    for n, p in reference.named_parameters():
        g = p.grad.clone()
        if world_size > 1:
            dist.all_reduce(g)
            g /= world_size
        ref_grads[n] = g
        ref_params[n] = p.detach() - LR * g
    ref_stats = dict(reference.named_buffers())
    loss_diff = abs(sum(x.item() for x in acc.losses) / len(acc.losses) - terms["loss"].item())
    if nan:
        moved = max((params[n] - p).abs().max().item() for n, p in reference.named_parameters())
        return {"applied": applied, "skip": skip, "moved": moved}
    return {
        "applied": applied,
        "num_params": len(names),
        "loss_diff": loss_diff,
        "grad_diff": max((grads[n] - ref_grads[n]).abs().max().item() for n in names),
        "param_diff": max((params[n] - ref_params[n]).abs().max().item() for n in names),
        "stats_diff": max(
            (stats[n].float() - ref_stats[n].float()).abs().max().item() for n in ref_stats
        ),
        "grad_norm": sum(ref_grads[n].norm().item() for n in names),
    }


def _all_cases(rank: int, world_size: int) -> dict[str, dict]:
    results = {}
    for i, (loss_name, k) in enumerate(CASES):
        stage = (i + 2 * (world_size - 1)) % 4
        results[f"global/{loss_name}/k{k}/zero{stage}"] = _case(
            loss_name, k, stage, rank, world_size
        )
    for loss_name, k, stage in (("contrastive", 2, 0), ("infonce", 4, 2), ("video_ssl", 2, 1)):
        key = f"micro/{loss_name}/k{k}/zero{stage}"
        results[key] = _case(loss_name, k, stage, rank, world_size, scope="micro")
    for scope in ("global", "micro"):
        for stage in (0, 1):
            key = f"nan/{scope}/zero{stage}"
            results[key] = _case("contrastive", 2, stage, rank, world_size, scope=scope, nan=True)
    return results


@pytest.fixture(scope="module", params=[1, 2], ids=lambda n: f"world{n}")
def accumulation(request):
    return run_in_group(_all_cases, request.param)


def test_global_negatives_give_one_big_batch_gradients_and_step(accumulation):
    exact = {k: v for k, v in accumulation.items() if k.startswith("global/")}
    assert len(exact) == len(CASES)
    assert {name.rsplit("/", 1)[1] for name in exact} == {"zero0", "zero1", "zero2", "zero3"}
    for name, r in exact.items():
        assert r["applied"], name
        assert r["num_params"] in (6, 12), name  # every Linear and BatchNorm tensor
        assert r["loss_diff"] < TOL, (name, r)
        assert r["grad_diff"] < TOL, (name, r)
        assert r["param_diff"] < TOL, (name, r)
        # Running statistics moved once per micro-batch, as the reference's.
        assert r["stats_diff"] < TOL, (name, r)
        assert r["grad_norm"] > 1e-2, name


def test_micro_batch_negatives_fail_the_same_check(accumulation):
    micro = {k: v for k, v in accumulation.items() if k.startswith("micro/")}
    assert len(micro) == 3
    for name, r in micro.items():
        assert r["applied"], name
        assert r["grad_diff"] > 100 * TOL, (name, r)
        assert r["param_diff"] > 100 * TOL * LR, (name, r)


def test_a_nonfinite_loss_skips_the_whole_step(accumulation):
    nan = {k: v for k, v in accumulation.items() if k.startswith("nan/")}
    assert len(nan) == 4
    for name, r in nan.items():
        assert r["skip"] and not r["applied"], (name, r)
        assert r["moved"] == 0.0, (name, r)
