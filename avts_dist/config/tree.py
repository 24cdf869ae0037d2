"""The whole tree, :class:`Config`: one section per component, and the checks across them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from avts_dist.config.common import fail
from avts_dist.config.curriculum import CurriculumConfig
from avts_dist.config.data import DataConfig
from avts_dist.config.eval import EvalConfig
from avts_dist.config.handoff import restore_secrets
from avts_dist.config.launch import LaunchConfig
from avts_dist.config.loss import LossConfig
from avts_dist.config.model import ModelConfig
from avts_dist.config.tracking import TrackingConfig
from avts_dist.config.train import (
    CheckpointConfig,
    DeepSpeedConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
)

__all__ = ["Config"]


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # none | auto (newest complete checkpoint of checkpoint.dir) | a run dir, checkpoints dir,
    # tag dir or URL (s3://..., file://...): see avts_dist.train.checkpoint.resolve_checkpoint
    resume: str = "none"

    def __post_init__(self) -> None:
        if self.train.max_steps == 0 and self.data.epochs == 0:
            fail("train.max_steps", "set train.max_steps > 0 or data.epochs > 0")
        if self.data.global_batch_size % self.deepspeed.grad_accum_steps:
            fail(
                "deepspeed.grad_accum_steps",
                f"must divide data.global_batch_size ({self.data.global_batch_size})",
            )
        if self.loss.negatives != "all" and self.loss.num_negatives >= self.data.global_batch_size:
            fail("loss.num_negatives", "must be < data.global_batch_size")
        if self.train.objective == "video_ssl" and self.model.arch != "two_stream":
            fail(
                "train.objective",
                "video_ssl trains the video net alone: needs model.arch=two_stream",
            )
        self._fill_stage_mixes()

    def _fill_stage_mixes(self) -> None:
        """A curriculum stage without a mix draws ``data.negative_mix``. A stage with a mix of its
        own would overrule ``data.negative_mix`` from its first step: both given is an error."""
        data_mix = dict(self.data.negative_mix)
        for i, stage in enumerate(self.curriculum.stages):
            if data_mix and stage.negative_mix and dict(stage.negative_mix) != data_mix:
                fail(
                    "data.negative_mix",
                    f"curriculum.stages.{i}.negative_mix ({dict(stage.negative_mix)}) sets the "
                    "mix instead; give the mix in the curriculum's stages, or leave their "
                    "negative_mix empty for data.negative_mix to apply",
                )
        for stage in self.curriculum.stages:
            if not stage.negative_mix:
                stage.negative_mix = self.data.initial_negative_mix

    def fill_derived(self) -> Config:
        """Fills defaults that depend on other keys (after every layer has merged)."""
        if not self.run.dir:
            self.run.dir = str(Path("runs") / self.run.name)
        if not self.checkpoint.dir:
            self.checkpoint.dir = str(Path(self.run.dir) / "checkpoints")
        restore_secrets(self)
        return self
