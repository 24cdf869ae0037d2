"""The curriculum scheduler: every trigger, the ablation, the shipped YAML fragments, state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from avts_dist.config import ConfigError, CurriculumConfig, CurriculumStage, load_config
from avts_dist.curriculum import Curriculum, CurriculumStateError

EASY = {"easy": 1.0}
MIXED = {"easy": 0.75, "hard": 0.25}
REPO = Path(__file__).resolve().parents[2]


def _cfg(*stages: CurriculumStage, enabled: bool = True) -> CurriculumConfig:
    return CurriculumConfig(enabled=enabled, stages=list(stages))


def test_epoch_trigger_from_the_shipped_fragment():
    cur = Curriculum(load_config("configs/curriculum/easy_then_hard.yaml").curriculum)
    assert cur.stage.name == "easy" and cur.negative_mix == EASY
    assert cur.update(step=0, epoch=0) == []
    assert cur.update(step=57, epoch=1) == []
    (event,) = cur.update(step=64, epoch=2)
    assert event["trigger"] == "epoch" and event["until_epoch"] == 2
    assert (event["from_stage"], event["to_stage"], event["step"]) == ("easy", "easy_hard", 64)
    assert event["negative_mix"] == MIXED == cur.negative_mix
    assert cur.update(step=10_000, epoch=50) == []  # the last stage never ends


def test_step_trigger_and_normalised_mix():
    cur = Curriculum(
        _cfg(
            CurriculumStage(name="a", negative_mix={"easy": 2.0}, until_step=100),
            CurriculumStage(name="b", negative_mix={"easy": 3.0, "superhard": 1.0}),
        )
    )
    assert cur.update(step=99, epoch=0) == []
    (event,) = cur.update(step=100, epoch=0)
    assert event["trigger"] == "step" and event["to_stage"] == "b"
    assert cur.negative_mix == {"easy": 0.75, "superhard": 0.25}


def _plateau_cur(mode="max"):
    return Curriculum(
        _cfg(
            CurriculumStage(
                name="a",
                negative_mix=EASY,
                plateau_metric="val/acc/easy",
                plateau_patience=2,
                plateau_min_delta=0.01,
                plateau_mode=mode,
            ),
            CurriculumStage(name="b", negative_mix=MIXED, loss_weights={"hard": 2.0}),
        )
    )


def test_plateau_trigger_patience_and_min_delta():
    cur = _plateau_cur()
    for step, acc in enumerate([0.50, 0.60, 0.70]):  # clear improvements: patience untouched
        assert cur.update(step=step, epoch=0, val_metrics={"val/acc/easy": acc}) == []
    assert cur.update(step=3, epoch=0, val_metrics={"val/acc/easy": 0.705}) == []  # < min_delta
    assert cur.update(step=4, epoch=0, val_metrics={"val/loss": 1.0}) == []  # metric absent
    assert cur.update(step=5, epoch=0) == []  # no validation: nothing counted
    (event,) = cur.update(step=6, epoch=0, val_metrics={"val/acc/easy": 0.69})
    assert event["trigger"] == "plateau" and event["metric"] == "val/acc/easy"
    assert event["best"] == pytest.approx(0.70) and event["num_bad_evals"] == 2
    assert cur.loss_weights == {"hard": 2.0} == event["loss_weights"]


def test_plateau_resets_after_an_improvement_and_supports_min_mode():
    cur = _plateau_cur(mode="min")
    for step, loss in enumerate([1.0, 1.0, 0.5, 0.5]):  # bad, improvement, bad
        assert cur.update(step=step, epoch=0, val_metrics={"val/acc/easy": loss}) == []
    assert len(cur.update(step=9, epoch=0, val_metrics={"val/acc/easy": 0.6})) == 1


def test_several_transitions_in_one_update():
    cur = Curriculum(load_config("configs/curriculum/with_superhard.yaml").curriculum)
    events = cur.update(step=500, epoch=7)  # e.g. resuming a run far past two stages
    assert [e["to_stage"] for e in events] == ["easy_hard", "easy_hard_superhard"]
    assert cur.is_last_stage and cur.negative_mix["superhard"] == 0.25
    assert len(cur.history) == 2


def test_disabled_and_no_curriculum_give_the_final_mix_from_step_zero(tmp_path):
    final = Curriculum(load_config("configs/curriculum/easy_then_hard.yaml").curriculum)
    final.update(step=0, epoch=100)
    # A pretrain-style config that includes the fragment and turns it off on the command line.
    fragment = REPO / "configs/curriculum/easy_then_hard.yaml"
    pretrain = tmp_path / "pretrain.yaml"
    pretrain.write_text(f"includes: [{fragment}]\n")
    disabled = Curriculum(load_config(pretrain, ["curriculum.enabled=false"]).curriculum)
    ablation = Curriculum(load_config("configs/curriculum/no_curriculum.yaml").curriculum)
    for cur in (disabled, ablation):
        assert cur.negative_mix == final.negative_mix == MIXED
        assert cur.update(step=0, epoch=0) == [] and cur.update(step=10**6, epoch=10**3) == []
        assert cur.negative_mix == MIXED


def test_state_round_trip_continues_identically():
    def drive(cur, start, stop):
        events = []
        for step in range(start, stop):
            acc = [0.5, 0.6, 0.7, 0.7, 0.705, 0.9, 0.9, 0.9, 0.9, 0.9][step]
            events += cur.update(step=step, epoch=0, val_metrics={"val/acc/easy": acc})
        return events

    ref = _plateau_cur()
    ref_events = drive(ref, 0, 10)
    assert len(ref_events) == 1
    first = _plateau_cur()
    drive(first, 0, 4)  # mid-patience: one bad evaluation counted
    state = json.loads(json.dumps(first.state_dict()))  # plain JSON types
    assert state["num_bad_evals"] == 1 and state["stage_name"] == "a"
    resumed = _plateau_cur()
    resumed.load_state_dict(state)
    assert drive(resumed, 4, 10) == ref_events
    assert resumed.state_dict() == ref.state_dict()


def test_load_state_by_name_and_errors():
    cur = _plateau_cur()
    cur.update(step=0, epoch=0, val_metrics={"val/acc/easy": 0.1})
    for _ in range(2):
        cur.update(step=1, epoch=0, val_metrics={"val/acc/easy": 0.1})
    state = cur.state_dict()
    assert state["stage_name"] == "b"
    # A config that gained a stage in front still resumes on the stage of the same name.
    grown = Curriculum(_cfg(CurriculumStage(name="warmup", until_step=1), *_plateau_cur().stages))
    grown.load_state_dict(state)
    assert grown.stage.name == "b" and grown.stage_index == 2
    other = Curriculum(_cfg(CurriculumStage(name="x")))
    with pytest.raises(CurriculumStateError, match="'b' is not in curriculum.stages"):
        other.load_state_dict(state)
    with pytest.raises(CurriculumStateError, match="version"):
        cur.load_state_dict({**state, "version": 99})


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"curriculum.stages.0"):
        _cfg(CurriculumStage(name="a"), CurriculumStage(name="b"))  # first stage never ends
    with pytest.raises(ConfigError, match=r"curriculum.stages.0.plateau_mode"):
        _cfg(CurriculumStage(plateau_mode="up"))
    with pytest.raises(ConfigError, match=r"curriculum.stages.0.negative_mix"):
        _cfg(CurriculumStage(negative_mix={"medium": 1.0}))
    with pytest.raises(ConfigError, match="curriculum.stages"):
        load_config(None, ["curriculum.stages=[]"])
