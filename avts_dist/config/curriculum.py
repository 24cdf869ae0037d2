"""``curriculum``: the stages of negative difficulty and their triggers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from avts_dist.config.common import NEGATIVE_KINDS, check_choices, check_mix, fail

__all__ = ["CurriculumConfig", "CurriculumStage"]


@dataclass
class CurriculumStage:
    name: str = "easy"
    # Empty means data.negative_mix (the whole Config fills it in; easy only when that is empty
    # too). The default must be empty: OmegaConf merges a YAML mapping into the default one, so
    # {hard: 1.0} would otherwise become {easy: 1.0, hard: 1.0}.
    negative_mix: dict[str, float] = field(default_factory=dict)
    # Loss weights per negative kind for this stage (merged over loss.weights).
    loss_weights: dict[str, float] = field(default_factory=dict)
    # The stage ends at the first trigger that fires; none set means it is the last stage.
    until_epoch: int | None = None
    until_step: int | None = None
    # Plateau trigger on a validation metric (e.g. val/sync_acc_easy).
    plateau_metric: str | None = None
    plateau_patience: int = 3
    plateau_min_delta: float = 0.001
    # max: the metric should rise (accuracy); min: it should fall (a loss).
    plateau_mode: Literal["max", "min"] = "max"


@dataclass
class CurriculumConfig:
    enabled: bool = True
    stages: list[CurriculumStage] = field(default_factory=lambda: [CurriculumStage()])

    def __post_init__(self) -> None:
        if not self.stages:
            fail("curriculum.stages", "needs at least one stage")
        for i, stage in enumerate(self.stages):
            check_choices(stage, f"curriculum.stages.{i}")
            if stage.negative_mix:
                check_mix(f"curriculum.stages.{i}.negative_mix", dict(stage.negative_mix))
            if stage.plateau_patience < 1:
                fail(f"curriculum.stages.{i}.plateau_patience", "must be >= 1")
            unknown = set(stage.loss_weights) - set(NEGATIVE_KINDS)
            if unknown:
                fail(f"curriculum.stages.{i}.loss_weights", f"unknown kind(s) {sorted(unknown)}")
            last = i == len(self.stages) - 1
            has_trigger = (
                stage.until_epoch is not None
                or stage.until_step is not None
                or stage.plateau_metric is not None
            )
            if not last and not has_trigger:
                fail(
                    f"curriculum.stages.{i}",
                    "every stage but the last needs until_epoch, until_step or plateau_metric",
                )
