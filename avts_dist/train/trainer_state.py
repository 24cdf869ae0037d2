"""The trainer's own resumable state: its counters, saved under the checkpoint's ``trainer`` key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrainerState"]


@dataclass
class TrainerState:
    """Where the loop is: the optimizer steps taken (applied or skipped), the skipped ones, the
    non-finite ones in a row, the loader's epoch at the last save and the last validation."""

    global_batch_size: int  # to count samples; configuration, not saved
    step: int = 0
    epoch: int = 0
    num_skipped_steps: int = 0
    num_nonfinite_in_row: int = 0
    val_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def samples_seen(self) -> int:
        return self.step * self.global_batch_size

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "num_skipped_steps": self.num_skipped_steps,
            "num_nonfinite_in_row": self.num_nonfinite_in_row,
            "samples_seen": self.samples_seen,
            "val_metrics": dict(self.val_metrics),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # samples_seen follows from step; epoch is informational (the loader's state has its own).
        self.step = int(state["step"])
        self.epoch = int(state.get("epoch", 0))
        self.num_skipped_steps = int(state["num_skipped_steps"])
        self.num_nonfinite_in_row = int(state["num_nonfinite_in_row"])
        self.val_metrics = dict(state.get("val_metrics", {}))
