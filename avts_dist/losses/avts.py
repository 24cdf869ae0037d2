"""AVTS losses with negatives gathered across ranks (the open_clip ``ClipLoss`` pattern:
``local_loss`` + ``gather_with_grad``, distributed context passed in explicitly).

Pairs and negatives, for a rank holding ``b`` samples of a global batch of ``B = b * world_size``:

- positive: ``(v_i, a_i)``, video and audio of the same clip, in sync;
- easy (in-batch): ``(v_i, a_j)``, ``j != i`` over the *global* batch -- audio of other videos
  (and, with ``symmetric``, ``(v_j, a_i)`` with audio anchors);
- extra: ``(v_i, n_i)``, the loader's extra negative audio of kind ``neg_kind[i]``
  (0 easy: another video, 1 hard: same video, no overlap, 2 super-hard: overlapping but shifted).

A model without per-modality embeddings (``model.arch=early_fusion``) passes ``video_emb`` and
``audio_emb`` as None and scores pairs itself: the loss is then the binary cross-entropy of its
sync logits alone (in sync -> 1, negatives -> 0), each negative weighted by its kind. Its logits
``neg_sync_logit`` may have several columns per anchor: column 0 the loader's negative, the
others in-batch easy negatives the model formed within its local batch (nothing is gathered).

Normalisation (why N ranks equal one process): every term is a sum over this rank's anchors
divided by the *local* batch ``b``. Gradients flow into other ranks' embeddings through the exact
gather (sum over ranks, no scaling). DeepSpeed/DDP then average gradients over ranks (sum / N),
which gives ``1/(N b) * sum over all anchors`` = the gradient of the global-batch mean that one
process computes on the whole batch. Per-rank loss values are local means; their mean over ranks
(:func:`reduce_metrics`) is the global-batch mean, and is what gets logged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from avts_dist.config import NEGATIVE_KINDS, LossConfig
from avts_dist.distributed.collectives import (
    GatherGroups,
    all_gather_no_grad,
    all_gather_with_grad,
    all_reduce_sum,
    hierarchical_all_gather_with_grad,
)

__all__ = ["AVTSContrastiveLoss", "AVTSInfoNCELoss", "reduce_metrics"]

_EPS = 1e-12


def _pairwise_dist(x_bD: torch.Tensor, y_BD: torch.Tensor) -> torch.Tensor:
    """L2 distances ``[b, B]`` through a matmul (``cdist``'s exact mode needs b*B*D memory).

    The clamp keeps sqrt's gradient finite at zero distance (the positive can reach it)."""
    sq = (x_bD * x_bD).sum(1, keepdim=True) + (y_BD * y_BD).sum(1)[None, :] - 2.0 * x_bD @ y_BD.T
    return sq.clamp_min(_EPS).sqrt()


def gather_global_batch(
    local_bD: torch.Tensor,
    world_size: int,
    with_grad: bool,
    groups: GatherGroups | None = None,
) -> torch.Tensor:
    """Every rank's rows in rank order: the exact gather (``loss.gather_with_grad``), in two
    levels when ``groups`` are given (``loss.gather``), or the naive one for the ablation;
    checks that the process group has ``world_size`` ranks."""
    if world_size == 1:
        return local_bD
    if not with_grad:
        out = all_gather_no_grad(local_bD)
    elif groups is None:
        out = all_gather_with_grad(local_bD)
    else:
        out = hierarchical_all_gather_with_grad(local_bD, groups)
    if out.shape[0] != local_bD.shape[0] * world_size:
        raise ValueError(
            f"loss called with world_size={world_size} but the process group gathered "
            f"{out.shape[0] // max(local_bD.shape[0], 1)} rank(s): start it with init_distributed()"
        )
    return out


class _AVTSLossBase(nn.Module):
    """Shared plumbing: input checks, gathering, negative selection, metrics."""

    def __init__(self, cfg: LossConfig, gather_groups: GatherGroups | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        # The hierarchical gather's process groups (collectives.gather_groups), None: flat.
        self.gather_groups = gather_groups
        # Counts calls so that random_k still varies per step when the trainer passes no step.
        self._num_calls = 0

    # -- helpers ---------------------------------------------------------------------------

    def _weights(self, override: dict[str, float] | None) -> dict[str, float]:
        merged = {k: 1.0 for k in NEGATIVE_KINDS}
        merged.update(self.cfg.weights)
        if override:
            unknown = set(override) - set(NEGATIVE_KINDS)
            if unknown:
                raise ValueError(f"loss weights: unknown negative kind(s) {sorted(unknown)}")
            merged.update(override)
        if any(w < 0 for w in merged.values()):
            raise ValueError(f"loss weights must be >= 0, got {merged}")
        return {k: float(v) for k, v in merged.items()}

    def _gather(self, t: torch.Tensor, world_size: int) -> torch.Tensor:
        return gather_global_batch(t, world_size, self.cfg.gather_with_grad, self.gather_groups)

    def _random_cols(self, step: int, num_global: int, k: int, device, rows: range | None = None):
        """``[2, len(rows), k]`` negative columns of the global anchors ``rows`` (None: all):
        ``k`` distinct ones per anchor and direction, none its positive, from a permutation of
        the offsets ``[1, B)`` drawn from (seed, step, direction, anchor) only, so every rank and
        a single process draw the same ones for the same global anchor; O(B) per local anchor."""
        rows = range(num_global) if rows is None else rows
        cols = torch.empty((2, len(rows), min(k, num_global - 1)), dtype=torch.long)
        for d in range(2):
            for i, row in enumerate(rows):
                key = ((self.cfg.seed * 1_000_003 + step) * 2 + d) * 1_000_033 + row
                gen = torch.Generator().manual_seed(key % 2**63)
                offsets = torch.randperm(num_global - 1, generator=gen)[: cols.shape[2]] + 1
                cols[d, i] = (row + offsets) % num_global
        return cols.to(device)

    def _prepare(self, video_emb, audio_emb, neg_audio_emb, neg_kind, rank, world_size, step):
        if video_emb.ndim != 2 or video_emb.shape != audio_emb.shape:
            raise ValueError(
                f"video_emb and audio_emb must both be [b, D], got {tuple(video_emb.shape)} and "
                f"{tuple(audio_emb.shape)}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        b = video_emb.shape[0]
        if neg_audio_emb is not None and neg_audio_emb.shape != audio_emb.shape:
            raise ValueError(
                f"neg_audio_emb must be {tuple(audio_emb.shape)}, got {tuple(neg_audio_emb.shape)}"
            )
        if neg_kind is None:
            neg_kind = torch.zeros(b, dtype=torch.long, device=video_emb.device)
        if neg_kind.shape != (b,):
            raise ValueError(f"neg_kind must be [b]={b}, got {tuple(neg_kind.shape)}")
        neg_kind = neg_kind.to(video_emb.device).long()
        v_all = self._gather(video_emb, world_size).float()
        a_all = self._gather(audio_emb, world_size).float()
        n_loc = neg_audio_emb.float() if neg_audio_emb is not None else None
        if self.cfg.normalize:
            v_all, a_all = F.normalize(v_all, dim=1), F.normalize(a_all, dim=1)
            n_loc = F.normalize(n_loc, dim=1) if n_loc is not None else None
        lo = rank * b
        if step is None:
            step = self._num_calls
        self._num_calls += 1
        num_global = v_all.shape[0]
        rand = None
        if self.cfg.negatives == "random_k" and num_global > 1:
            k, rows = self.cfg.num_negatives, range(lo, lo + b)
            rand = self._random_cols(step, num_global, k, v_all.device, rows)
        pos_cols = torch.arange(lo, lo + b, device=v_all.device)
        return v_all, a_all, n_loc, neg_kind, lo, b, pos_cols, rand

    def _select(self, score_bB, pos_cols, rand_bk, hardest_is_smallest: bool):
        """Column ids ``[b, k]`` of the chosen in-batch negatives, or None for all of them."""
        mode, num_global = self.cfg.negatives, score_bB.shape[1]
        if mode == "all" or num_global <= 1:
            return None
        k = min(self.cfg.num_negatives, num_global - 1)
        if mode == "random_k":
            return rand_bk[:, :k]
        fill = math.inf if hardest_is_smallest else -math.inf
        masked = score_bB.detach().scatter(1, pos_cols[:, None], fill)
        return masked.topk(k, dim=1, largest=not hardest_is_smallest).indices

    def _metrics(
        self, out, d_pos, d_batch_bB, d_neg, neg_kind, pos_cols, sync_logit, neg_sync_logit
    ):
        """Detached sync-accuracy and distance metrics, with the counts that
        :func:`reduce_metrics` needs to weight them across ranks."""
        threshold = self.cfg.margin / 2
        b = d_pos.shape[0]
        f32 = dict(dtype=torch.float32, device=d_pos.device)
        use_head = sync_logit is not None
        pos_ok = (sync_logit.reshape(b) > 0) if use_head else (d_pos < threshold)
        out["acc/pos"] = pos_ok.float().mean()
        out["dist/pos"] = d_pos.mean()
        out["num/pos"] = torch.tensor(float(b), **f32)
        off_diag = torch.ones_like(d_batch_bB, dtype=torch.bool).scatter(
            1, pos_cols[:, None], False
        )
        batch_d = d_batch_bB[off_diag]
        sum_d_all, num_all = batch_d.sum(), torch.tensor(float(batch_d.numel()), **f32)
        for k_id, kind in enumerate(NEGATIVE_KINDS):
            correct, count, dist_sum = (torch.zeros((), **f32) for _ in range(3))
            if kind == "easy" and not use_head:
                correct = correct + (batch_d >= threshold).float().sum()
                count = count + batch_d.numel()
                dist_sum = dist_sum + batch_d.sum()
            if d_neg is not None:
                sel = neg_kind == k_id
                if use_head and neg_sync_logit is not None:
                    neg_ok = neg_sync_logit.reshape(b) <= 0
                else:
                    neg_ok = d_neg >= threshold
                correct = correct + (neg_ok & sel).float().sum()
                count = count + sel.float().sum()
                dist_sum = dist_sum + (d_neg * sel).sum()
                sum_d_all = sum_d_all + (d_neg * sel).sum()
                num_all = num_all + sel.float().sum()
            safe = count.clamp_min(1.0)
            out[f"acc/neg_{kind}"] = correct / safe
            out[f"dist/neg_{kind}"] = dist_sum / safe
            out[f"num/neg_{kind}"] = count
            # Balanced (50/50 positives/negatives), as sync accuracy is reported in AVTS.
            out[f"acc/{kind}"] = 0.5 * (out["acc/pos"] + out[f"acc/neg_{kind}"])
        out["dist/neg"] = sum_d_all / num_all.clamp_min(1.0)
        out["num/neg"] = num_all

    def _head_term(self, sync_logit, neg_sync_logit, neg_kind, w, b):
        """BCE of the fusion head: in-sync pairs -> 1, negatives -> 0 (weighted by kind)."""
        if sync_logit is None:
            return None
        pos, per_kind, _ = _bce_terms(sync_logit, neg_sync_logit, neg_kind, b)
        return (pos.sum() + sum(w[k] * per_kind[k][0] for k in NEGATIVE_KINDS)) / b

    def forward(
        self,
        video_emb: torch.Tensor | None,
        audio_emb: torch.Tensor | None,
        neg_audio_emb: torch.Tensor | None = None,
        neg_kind: torch.Tensor | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        weights: dict[str, float] | None = None,
        sync_logit: torch.Tensor | None = None,
        neg_sync_logit: torch.Tensor | None = None,
        step: int | None = None,
    ) -> dict[str, torch.Tensor]:
        if video_emb is None and audio_emb is None:
            if not 0 <= rank < world_size:
                raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
            return self._logit_loss(sync_logit, neg_sync_logit, neg_kind, self._weights(weights))
        if video_emb is None or audio_emb is None:
            raise ValueError("video_emb and audio_emb must both be given, or both be None")
        prepared = self._prepare(
            video_emb, audio_emb, neg_audio_emb, neg_kind, rank, world_size, step
        )
        return self._embedding_loss(self._weights(weights), prepared, sync_logit, neg_sync_logit)

    def _logit_loss(self, sync_logit, neg_sync_logit, neg_kind, w) -> dict[str, torch.Tensor]:
        """The BCE-only mode (no embeddings): ``loss/pos`` and ``loss/<kind>`` are BCE sums over
        this rank's anchors divided by the local batch, like every term of the embedding losses,
        so N ranks equal one process without any gather."""
        if sync_logit is None:
            raise ValueError("the loss needs embeddings (video_emb, audio_emb) or sync_logit")
        b = sync_logit.reshape(-1).shape[0]
        if neg_kind is not None and neg_kind.shape != (b,):
            raise ValueError(f"neg_kind must be [b]={b}, got {tuple(neg_kind.shape)}")
        pos, per_kind, pos_ok = _bce_terms(sync_logit, neg_sync_logit, neg_kind, b)
        f32 = dict(dtype=torch.float32, device=pos.device)
        loss_pos = pos.sum() / b
        terms = {k: per_kind[k][0] / b for k in NEGATIVE_KINDS}
        loss = self.cfg.pos_weight * loss_pos + sum(w[k] * terms[k] for k in NEGATIVE_KINDS)
        out: dict[str, torch.Tensor] = {"loss/pos": loss_pos.detach()}
        out |= {f"loss/{k}": terms[k].detach() for k in NEGATIVE_KINDS}
        out["loss/head"] = (loss_pos + sum(terms.values())).detach()
        out["loss"] = loss
        out["acc/pos"] = pos_ok.float().mean()
        out["num/pos"] = torch.tensor(float(b), **f32)
        for kind in NEGATIVE_KINDS:
            _, correct, count = per_kind[kind]
            out[f"acc/neg_{kind}"] = correct / count.clamp_min(1.0)
            out[f"num/neg_{kind}"] = count
            out[f"acc/{kind}"] = 0.5 * (out["acc/pos"] + out[f"acc/neg_{kind}"])
        return out


def _bce_terms(sync_logit, neg_sync_logit, neg_kind, b):
    """Per-pair BCE of sync logits: positives ``[b]``; per negative kind ``(bce sum, correct,
    count)``; and which positives are scored in sync. Column 0 of ``neg_sync_logit`` is the
    loader's negative (of kind ``neg_kind``, easy when None), further columns easy negatives."""
    sync = sync_logit.reshape(b).float()
    pos = F.binary_cross_entropy_with_logits(sync, torch.ones_like(sync), reduction="none")
    zero = torch.zeros((), dtype=torch.float32, device=sync.device)
    per_kind = {k: (zero, zero, zero) for k in NEGATIVE_KINDS}
    if neg_sync_logit is not None:
        cols_bK = neg_sync_logit.reshape(b, -1).float()
        per_bK = F.binary_cross_entropy_with_logits(
            cols_bK, torch.zeros_like(cols_bK), reduction="none"
        )
        kinds_bK = torch.zeros_like(cols_bK, dtype=torch.long)
        if neg_kind is not None:
            kinds_bK[:, 0] = neg_kind.to(cols_bK.device).long()
        for k_id, kind in enumerate(NEGATIVE_KINDS):
            sel = (kinds_bK == k_id).float()
            per_kind[kind] = (
                (per_bK * sel).sum(),
                ((cols_bK <= 0).float() * sel).sum(),
                sel.sum(),
            )
    return pos, per_kind, sync > 0


class AVTSContrastiveLoss(_AVTSLossBase):
    """``y d^2 + (1 - y) max(eta - d, 0)^2`` (AVTS; eta = ``cfg.margin``), terms per negative kind:

    loss = pos_weight * loss/pos + w_easy * loss/easy + w_hard * loss/hard + w_superhard * loss/superhard
           (+ head_weight * loss/head when the model has a fusion head)

    ``loss/easy`` per anchor is the mean hinge over its chosen in-batch negatives (all, random k,
    hardest k; averaged over both directions with ``symmetric``) plus the extra negative when
    it is of kind easy; ``loss/hard``/``loss/superhard`` hold the extra negatives of those kinds.
    """

    def _embedding_loss(self, w, prepared, sync_logit, neg_sync_logit) -> dict[str, torch.Tensor]:
        v_all, a_all, n_loc, neg_kind, lo, b, pos_cols, rand = prepared
        v_loc, a_loc = v_all[lo : lo + b], a_all[lo : lo + b]
        eta = self.cfg.margin
        rows = torch.arange(b, device=v_all.device)

        sq_pos = ((v_loc - a_loc) ** 2).sum(1)
        loss_pos = sq_pos.sum() / b

        directions = [(v_loc, a_all)] + ([(a_loc, v_all)] if self.cfg.symmetric else [])
        easy_batch = torch.zeros((), device=v_all.device)
        d_va = None
        for i, (anchor, others) in enumerate(directions):
            d = _pairwise_dist(anchor, others)
            if i == 0:
                d_va = d
            hinge = F.relu(eta - d) ** 2
            idx = self._select(d, pos_cols, rand[i] if rand is not None else None, True)
            if idx is None:
                num_neg = max(d.shape[1] - 1, 1)
                hinge = hinge.scatter(1, pos_cols[:, None], 0.0)
                per_anchor = hinge.sum(1) / num_neg
            else:
                per_anchor = hinge.gather(1, idx).mean(1)
            easy_batch = easy_batch + per_anchor.sum() / b
        easy_batch = easy_batch / len(directions)

        terms = {"easy": easy_batch}
        d_neg = None
        if n_loc is not None:
            d_neg = ((v_loc - n_loc) ** 2).sum(1).clamp_min(_EPS).sqrt()
            hinge_neg = F.relu(eta - d_neg) ** 2
            for k_id, kind in enumerate(NEGATIVE_KINDS):
                extra = (hinge_neg * (neg_kind == k_id)).sum() / b
                terms[kind] = terms.get(kind, 0.0) + extra
        for kind in NEGATIVE_KINDS:
            terms.setdefault(kind, torch.zeros((), device=v_all.device))

        loss = self.cfg.pos_weight * loss_pos + sum(w[k] * terms[k] for k in NEGATIVE_KINDS)
        out: dict[str, torch.Tensor] = {"loss/pos": loss_pos.detach()}
        for kind in NEGATIVE_KINDS:
            out[f"loss/{kind}"] = terms[kind].detach()
        head = self._head_term(sync_logit, neg_sync_logit, neg_kind, w, b)
        if head is not None:
            loss = loss + self.cfg.head_weight * head
            out["loss/head"] = head.detach()
        out["loss"] = loss
        with torch.no_grad():
            d_pos = d_va[rows, pos_cols]
            self._metrics(out, d_pos, d_va, d_neg, neg_kind, pos_cols, sync_logit, neg_sync_logit)
        return out


class AVTSInfoNCELoss(_AVTSLossBase):
    """InfoNCE over the global batch with temperature ``cfg.temperature``.

    Per anchor: ``-s_pos + logsumexp(s_pos, s_negs + log w_kind)``, i.e. ``loss/pos`` (alignment)
    + ``loss/neg`` (the log partition). Kind weights scale a negative's share of the partition
    (``w = 0`` removes it); ``pos_weight`` scales the alignment term (1 = plain cross-entropy).
    The extra negative audio joins the video anchor's row; with ``symmetric`` the audio anchors'
    rows (audio vs all videos) are averaged in.
    """

    def _embedding_loss(self, w, prepared, sync_logit, neg_sync_logit) -> dict[str, torch.Tensor]:
        v_all, a_all, n_loc, neg_kind, lo, b, pos_cols, rand = prepared
        v_loc, a_loc = v_all[lo : lo + b], a_all[lo : lo + b]
        rows = torch.arange(b, device=v_all.device)
        temp = self.cfg.temperature

        def log_w(x: float) -> float:
            return math.log(x) if x > 0 else -math.inf

        directions = [(v_loc, a_all)] + ([(a_loc, v_all)] if self.cfg.symmetric else [])
        align, partition = (
            torch.zeros((), device=v_all.device),
            torch.zeros((), device=v_all.device),
        )
        for i, (anchor, others) in enumerate(directions):
            s = anchor @ others.T / temp
            s_pos = s[rows, pos_cols]
            idx = self._select(s, pos_cols, rand[i] if rand is not None else None, False)
            if idx is None:
                bias = torch.full_like(s, log_w(w["easy"])).scatter(1, pos_cols[:, None], 0.0)
                logits = s + bias
            else:
                logits = torch.cat([s_pos[:, None], s.gather(1, idx) + log_w(w["easy"])], dim=1)
            if i == 0 and n_loc is not None:
                kind_logw = torch.tensor([log_w(w[k]) for k in NEGATIVE_KINDS], device=s.device)
                s_extra = (anchor * n_loc).sum(1) / temp + kind_logw[neg_kind]
                logits = torch.cat([logits, s_extra[:, None]], dim=1)
            align = align - s_pos.sum() / b
            partition = partition + torch.logsumexp(logits, dim=1).sum() / b
        align, partition = align / len(directions), partition / len(directions)

        loss = self.cfg.pos_weight * align + partition
        out: dict[str, torch.Tensor] = {"loss/pos": align.detach(), "loss/neg": partition.detach()}
        head = self._head_term(sync_logit, neg_sync_logit, neg_kind, w, b)
        if head is not None:
            loss = loss + self.cfg.head_weight * head
            out["loss/head"] = head.detach()
        out["loss"] = loss
        with torch.no_grad():
            d_va = _pairwise_dist(v_loc, a_all)
            d_neg = None
            if n_loc is not None:
                d_neg = ((v_loc - n_loc) ** 2).sum(1).clamp_min(_EPS).sqrt()
            self._metrics(
                out,
                d_va[rows, pos_cols],
                d_va,
                d_neg,
                neg_kind,
                pos_cols,
                sync_logit,
                neg_sync_logit,
            )
        return out


def reduce_metrics(out: dict[str, torch.Tensor], world_size: int) -> dict[str, float]:
    """Global-batch values of a loss output, as Python floats (one all-reduce, one host sync:
    call it at log steps only). Loss terms are local means over equal local batches, so their
    mean over ranks is the global mean; accuracies and distances are weighted by their counts."""
    keys, values, weights = [], [], []
    for key, value in out.items():
        if key.startswith("num/"):
            continue
        if key.startswith("loss"):
            weight = None
        elif key in ("acc/pos", "dist/pos"):
            weight = out["num/pos"]
        elif key.startswith(("acc/neg_", "dist/neg_")):
            weight = out["num/neg_" + key.split("neg_", 1)[1]]
        elif key == "dist/neg":
            weight = out["num/neg"]
        elif "num/" + key.split("/", 1)[-1] in out:  # e.g. acc/view weighted by num/view
            weight = out["num/" + key.split("/", 1)[-1]]
        else:
            continue  # balanced accuracies: recomputed from the reduced parts below
        weight = torch.ones((), device=value.device) if weight is None else weight.float()
        keys.append(key)
        values.append(value.detach().float() * weight)
        weights.append(weight)
    if not keys:
        return {}
    packed = torch.stack(values + weights)
    if world_size > 1:
        packed = all_reduce_sum(packed)
    host = packed.tolist()  # one host sync (log steps only)
    sums, counts = host[: len(keys)], host[len(keys) :]
    result = {k: s / c for k, s, c in zip(keys, sums, counts, strict=True) if c > 0}
    for kind in NEGATIVE_KINDS:
        if "acc/pos" in result and f"acc/neg_{kind}" in result:
            result[f"acc/{kind}"] = 0.5 * (result["acc/pos"] + result[f"acc/neg_{kind}"])
    return result
