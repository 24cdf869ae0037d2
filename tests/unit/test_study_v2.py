"""configs/study/v2.yaml is the protocol of docs/results.md section 3: section 1's grid on corpus
version 2, one budget B for every arm with the easy stage until B / 2, and a gate invocation
that runs only pretrainings and sync evaluations."""

from __future__ import annotations

from avts_dist.config import REPO_ROOT
from launch import study as S

V2 = str(REPO_ROOT / "configs" / "study" / "v2.yaml")
MAIN = str(REPO_ROOT / "configs" / "study" / "main.yaml")
GATE = [f"evals.{name}.arms=[]" for name in ("lowlabel_rhythm", "lowlabel_appearance", "lowlabel_t3")]  # fmt: skip


def test_v2_corpus_is_section_1s_corpus_in_version_2():
    v1 = S.synth_argv(S.load_study(MAIN))
    v2 = S.synth_argv(S.load_study(V2))
    assert v2 == [*[a.replace("data/study", "data/study_v2") for a in v1], "--version", "2"]


def test_every_arm_has_the_same_budget_and_half_of_it_easy(tmp_path):
    study = S.load_study(V2, [f"runs={tmp_path}"])
    p = S.plan(study, "debug")
    budgets = {u.config.train.max_steps for u in p.units}
    assert len(budgets) == 1
    budget = budgets.pop()
    assert budget in (300, 600, 1200, 2400)
    for unit in p.units:
        cfg = unit.config
        assert cfg.checkpoint.every_steps == budget // 2
        if unit.arm in ("avts", "avts_superhard", "early_fusion"):
            assert cfg.curriculum.enabled and cfg.curriculum.stages[0].until_step == budget // 2
            assert cfg.curriculum.stages[0].negative_mix == {"easy": 1.0}
        last_mix = cfg.curriculum.stages[-1].negative_mix
        if unit.arm == "avts_superhard":
            assert last_mix == {"easy": 0.5, "hard": 0.25, "superhard": 0.25}
        else:
            assert last_mix == {"easy": 0.5, "hard": 0.5}
    arms = {u.arm for u in p.units}
    assert arms == {"avts", "avts_no_curriculum", "avts_superhard", "early_fusion", "video_ssl"}
    assert {u.seed for u in p.units} == {0, 1, 2}


def test_the_gate_runs_pretrainings_and_sync_only(tmp_path):
    units = S.expand(S.load_study(V2, [*GATE, f"runs={tmp_path}"]))
    assert len(units) == 15
    assert {e.name for u in units for e in u.evals} == {"sync"}
    assert {u.arm for u in units if u.evals} == {
        "avts",
        "avts_no_curriculum",
        "avts_superhard",
        "early_fusion",
    }
