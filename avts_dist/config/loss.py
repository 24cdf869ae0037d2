"""``loss``: the contrastive (or InfoNCE) loss and its negatives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from avts_dist.config.common import NEGATIVE_KINDS, check_choices, fail

__all__ = ["LossConfig"]


@dataclass
class LossConfig:
    # contrastive: the AVTS margin loss.
    kind: Literal["contrastive", "infonce"] = "contrastive"
    margin: float = 0.99
    normalize: bool = True
    temperature: float = 0.07
    # Easy negatives from the global batch.
    negatives: Literal["all", "random_k", "hardest_k"] = "all"
    num_negatives: int = 1
    # With deepspeed.grad_accum_steps > 1: global = the negatives of the whole batch (embedding
    # cache, train/accumulation.py); micro = each micro-batch's own (a different objective).
    negatives_scope: Literal["global", "micro"] = "global"
    # Weight of each negative kind, and of positives against negatives.
    weights: dict[str, float] = field(
        default_factory=lambda: {"easy": 1.0, "hard": 1.0, "superhard": 1.0}
    )
    pos_weight: float = 1.0
    gather_with_grad: bool = True
    # How the exact gather runs: flat (one all-gather over the world), hierarchical (within each
    # node, then across nodes: docs/scale.md, "The gather at 512 GPUs"), auto (hierarchical on
    # more than one node with more than one rank per node). Same tensor and gradients.
    gather: Literal["flat", "hierarchical", "auto"] = "flat"
    # Both directions: video anchors vs all audio and audio anchors vs all video.
    symmetric: bool = True
    # Seed of the random_k negative draw (with the step: identical at any world size).
    seed: int = 0
    # Weight of the fusion head's sync BCE term (used only when the model returns sync logits).
    head_weight: float = 1.0
    # train.objective=video_ssl: InfoNCE temperature of the two-view loss (CVRL uses 0.1).
    video_ssl_temperature: float = 0.1

    def __post_init__(self) -> None:
        check_choices(self, "loss")
        if self.negatives != "all" and self.num_negatives < 1:
            fail("loss.num_negatives", "must be >= 1 with random_k or hardest_k")
        if self.gather == "hierarchical" and not self.gather_with_grad:
            fail("loss.gather", "hierarchical needs loss.gather_with_grad=true")
        if self.margin <= 0:
            fail("loss.margin", "must be > 0")
        if self.temperature <= 0:
            fail("loss.temperature", "must be > 0")
        if self.video_ssl_temperature <= 0:
            fail("loss.video_ssl_temperature", "must be > 0")
        unknown = set(self.weights) - set(NEGATIVE_KINDS)
        if unknown:
            fail("loss.weights", f"unknown negative kind(s) {sorted(unknown)}")
