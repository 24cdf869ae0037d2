"""The curriculum scheduler: which negatives the loader draws and how the loss weighs them.

AVTS trains on easy negatives first and then mixes in hard ones (a public reproduction: easy
only, then 75% easy / 25% hard); super-hard negatives are offered as an optional last stage.
Stages come from ``cfg.curriculum.stages`` (YAML fragments in ``configs/curriculum/``). A stage
ends at the first of its triggers that fires:

- ``until_epoch``: when the epoch index reaches it (``until_epoch: 2`` = epochs 0 and 1);
- ``until_step``: when the global step reaches it;
- ``plateau_metric``: when that validation metric has not improved by more than
  ``plateau_min_delta`` for ``plateau_patience`` evaluations in a row (``plateau_mode`` max/min).

The trainer calls :meth:`Curriculum.update` at step/epoch boundaries and after validation, logs
the returned events, and pushes :attr:`negative_mix` to ``loader.set_negative_mix`` and
:attr:`loss_weights` to the loss's ``weights=``. The scheduler is part of the checkpointed state
(:meth:`state_dict`, plain JSON types). With ``curriculum.enabled=false`` it sits on the last
stage from step 0: the same final mix without the curriculum, for the ablation.
"""

from __future__ import annotations

import copy
from typing import Any

from avts_dist.config import CurriculumConfig, CurriculumStage

__all__ = ["Curriculum", "CurriculumStateError"]

STATE_VERSION = 1


class CurriculumStateError(ValueError):
    """A saved curriculum state that does not fit the configured stages."""


class Curriculum:
    def __init__(self, cfg: CurriculumConfig) -> None:
        self.cfg = cfg
        self.stages: list[CurriculumStage] = list(cfg.stages)
        self._index = 0 if cfg.enabled else len(self.stages) - 1
        self._best: float | None = None
        self._num_bad_evals = 0
        self._history: list[dict[str, Any]] = []

    # -- what the trainer reads ------------------------------------------------------------

    @property
    def stage(self) -> CurriculumStage:
        return self.stages[self._index]

    @property
    def stage_index(self) -> int:
        return self._index

    @property
    def negative_mix(self) -> dict[str, float]:
        """The current stage's mix, normalised to probabilities (for ``set_negative_mix``)."""
        # Empty only in a CurriculumConfig built outside a Config (which fills in data's mix).
        mix = {k: float(v) for k, v in (self.stage.negative_mix or {"easy": 1.0}).items()}
        total = sum(mix.values())
        return {k: v / total for k, v in mix.items()}

    @property
    def loss_weights(self) -> dict[str, float]:
        """Per-kind loss weights of the stage (the loss merges them over ``loss.weights``)."""
        return {k: float(v) for k, v in self.stage.loss_weights.items()}

    @property
    def is_last_stage(self) -> bool:
        return self._index == len(self.stages) - 1

    @property
    def history(self) -> list[dict[str, Any]]:
        return copy.deepcopy(self._history)

    def describe(self) -> dict[str, Any]:
        """The current stage as a loggable dict (e.g. at start or after a resume)."""
        return {
            "stage": self.stage.name,
            "stage_index": self._index,
            "negative_mix": self.negative_mix,
            "loss_weights": self.loss_weights,
            "enabled": self.cfg.enabled,
        }

    # -- transitions -----------------------------------------------------------------------

    def update(
        self, *, step: int, epoch: int, val_metrics: dict[str, float] | None = None
    ) -> list[dict[str, Any]]:
        """Advances through every stage whose trigger has fired; returns one event per move.

        Several moves can happen in one call (e.g. a resume at epoch 5 past two epoch stages).
        ``val_metrics`` is one validation result (counted once for the plateau trigger).
        """
        if val_metrics is not None:
            self._observe(val_metrics)
        events = []
        while not self.is_last_stage:
            trigger = self._fired(step, epoch)
            if trigger is None:
                break
            events.append(self._advance(trigger, step, epoch))
        return events

    def _observe(self, val_metrics: dict[str, float]) -> None:
        stage = self.stage
        if self.is_last_stage or stage.plateau_metric is None:
            return
        if stage.plateau_metric not in val_metrics:
            return  # not measured this time: neither progress nor patience spent
        value = float(val_metrics[stage.plateau_metric])
        sign = 1.0 if stage.plateau_mode == "max" else -1.0
        if self._best is None or sign * (value - self._best) > stage.plateau_min_delta:
            self._best, self._num_bad_evals = value, 0
        else:
            self._num_bad_evals += 1

    def _fired(self, step: int, epoch: int) -> dict[str, Any] | None:
        stage = self.stage
        if stage.until_epoch is not None and epoch >= stage.until_epoch:
            return {"trigger": "epoch", "until_epoch": stage.until_epoch}
        if stage.until_step is not None and step >= stage.until_step:
            return {"trigger": "step", "until_step": stage.until_step}
        if stage.plateau_metric is not None and self._num_bad_evals >= stage.plateau_patience:
            return {
                "trigger": "plateau",
                "metric": stage.plateau_metric,
                "best": self._best,
                "num_bad_evals": self._num_bad_evals,
            }
        return None

    def _advance(self, trigger: dict[str, Any], step: int, epoch: int) -> dict[str, Any]:
        previous = self.stage.name
        self._index += 1
        self._best, self._num_bad_evals = None, 0
        event = {
            "event": "curriculum_transition",
            "step": int(step),
            "epoch": int(epoch),
            "from_stage": previous,
            "to_stage": self.stage.name,
            "stage_index": self._index,
            **trigger,
            "negative_mix": self.negative_mix,
            "loss_weights": self.loss_weights,
        }
        self._history.append(event)
        return copy.deepcopy(event)

    # -- checkpointed state ----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "stage_index": self._index,
            "stage_name": self.stage.name,
            "stage_names": [s.name for s in self.stages],
            "best": self._best,
            "num_bad_evals": self._num_bad_evals,
            "history": copy.deepcopy(self._history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the stage by name (so stages may be appended between runs) and the plateau
        bookkeeping; a stage name that the config no longer has is an error."""
        version = state.get("version")
        if version != STATE_VERSION:
            raise CurriculumStateError(
                f"curriculum state version {version!r} is not supported (expected {STATE_VERSION})"
            )
        names = [s.name for s in self.stages]
        name = state["stage_name"]
        index = int(state["stage_index"])
        if not (index < len(names) and names[index] == name):
            if name not in names:
                raise CurriculumStateError(
                    f"checkpointed curriculum stage {name!r} is not in curriculum.stages {names}"
                )
            index = names.index(name)
        self._index = index
        self._best = state.get("best")
        self._num_bad_evals = int(state.get("num_bad_evals", 0))
        self._history = copy.deepcopy(list(state.get("history", [])))
